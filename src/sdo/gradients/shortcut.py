"""Shortcut Diffusion Optimization (Dou et al., 2025): one denoiser call keeps its graph and the gradient reaches
everything else through the solver updates (Eqs. 18-20), optionally on a Picard forward pass (ParaDiGMS)."""

from __future__ import annotations

import torch

from ..checks import UsageError
from ..picard import Picard
from .base import Strategy, randint, register_strategy

__all__ = ["Shortcut"]


@register_strategy("sdo")
class Shortcut(Strategy):
    """Shortcut Diffusion Optimization: one denoiser call keeps its graph; the gradient reaches everything
    else through the solver updates (Eqs. 18-20 of Dou et al., 2025).

    ``at="first"``: the first step that runs (the gradient for the latent being optimized, Eq. 19);
    ``"random"``: a step drawn uniformly on every run (for parameters, Eqs. 17 and 20); an int: that absolute
    step index (0 is the first, noisiest step of the chain).

    ``picard``: run the forward pass by Picard sweeps (:class:`~sdo.Picard`, ParaDiGMS; ``True`` for the default
    options), batched over a window of steps instead of one step after another. The solver updates are then
    replayed one by one with the sweeps' model outputs held fixed, and only the kept step's denoiser call is
    re-run with its graph: the graph of the sequential run, so at convergence (tol -> 0) the gradient is the
    sequential one. It costs the sweeps plus that one call.
    """

    def __init__(self, at: str | int = "first", generator: torch.Generator | None = None,
                 picard: Picard | bool | None = None):
        if at not in ("first", "random") and not (isinstance(at, int) and not isinstance(at, bool) and at >= 0):
            raise UsageError(f"at must be 'first', 'random' or a step index >= 0, got {at!r}")
        if picard is True:
            picard = Picard()
        if not (picard in (None, False) or isinstance(picard, Picard)):
            raise TypeError(f"picard must be an sdo.Picard, True or None, got {type(picard).__name__}")
        self.at, self.generator, self.picard = at, generator, picard or None

    @classmethod
    def for_weights(cls, *, steps, generator=None, k=1):  # a random step per trajectory (Eq. 20); a latent: the first
        return cls(at="random", generator=generator)

    def select(self, steps):
        if self.at == "first":
            return {steps.start}
        if self.at == "random":
            return {randint(steps.start, steps.stop - 1, self.generator)}
        if self.at not in steps:
            raise UsageError(f"Shortcut(at={self.at}) is outside the steps that run ({steps.start}..{steps.stop - 1})")
        return {self.at}

    def run(self, chain, x, state, steps):
        if self.picard is None:
            return super().run(chain, x, state, steps)
        return self.run_sweeps(chain, x, state, steps)[0]

    def run_sweeps(self, chain, x, state, steps, init: list[torch.Tensor] | None = None):
        """``(x_last, the sweeps' PicardResult)`` of a run with ``picard`` set, its sweeps started from ``init``
        (default: the options' own): what a caller that carries a warm start from run to run needs."""
        (keep,) = self.select(steps)
        sweeps = self.picard(chain, x, state, steps, init)
        for i, out in zip(steps, sweeps.outputs, strict=True):
            if i == keep and torch.is_grad_enabled():
                out = chain.denoise(i, x)
            x, state = chain.update(i, x, out, state)
        return x, sweeps
