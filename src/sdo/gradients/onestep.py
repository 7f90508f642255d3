"""Cheap reward gradients of one denoiser call on a sample made without a graph, for weights only (the latent that
started the chain gets no gradient, by construction): ReFL (Xu et al., 2023), DRaFT-LV (Clark et al., 2024) and
Direct-Align (Shen et al., 2025, SRPO)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..checks import UsageError, check_int
from ..solvers import DPMSolverPP
from .base import Strategy, randint, register_strategy

__all__ = ["DRaFTLV", "DirectAlign", "ReFL"]


@register_strategy("refl")
class ReFL(Strategy):
    """ReFL (Reward Feedback Learning; Xu et al., 2023, ImageReward, Alg. 1): the chain runs without a graph to a
    step ``t`` drawn uniformly from its last quarter (the paper's 40 steps: t in 30..39), that step's denoiser call
    keeps its graph, and the result is that call's one-step prediction of the clean sample, x0_hat = the solver's
    ``denoised(t, x_t, out)`` (for an epsilon model, (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)), in place of the
    sample: the later steps do not run. The paper trains with a pre-training loss beside the reward.

    ``low``: the share of the chain before the first step that may be drawn (0.75: the last quarter)."""

    gives_latent_gradient: ClassVar[bool] = False

    def __init__(self, low: float = 0.75, generator: torch.Generator | None = None):
        if not 0.0 <= float(low) < 1.0:
            raise UsageError(f"low must be in [0, 1), got {low}")
        self.low, self.generator = float(low), generator

    @classmethod
    def for_weights(cls, *, steps, generator=None, k=1):
        return cls(generator=generator)

    def select(self, steps):
        first = steps.start + int(self.low * len(steps))
        return {randint(min(first, steps.stop - 1), steps.stop - 1, self.generator)}

    def run(self, chain, x, state, steps):
        (t,) = self.select(steps)
        with torch.no_grad():
            for i in range(steps.start, t):
                x, state = chain.step(i, x, state)
        return chain.solver.denoised(t, x, chain.denoise(t, x))


@register_strategy("draft-lv")
class DRaFTLV(Strategy):
    """DRaFT-LV (Clark et al., 2024, the low-variance DRaFT-1): the whole chain runs without a graph to x0; then
    ``n`` times the sample is noised again to the last step's input level with fresh noise, x1 = a x0 + s eps (the
    solver's ``levels``), and the last step runs from there with its graph. The ``n`` results come back stacked along
    the batch (``n`` x B samples, copy by copy), so a reward averaged over them averages the ``n`` gradients.

    Needs a deterministic one-step solver (DDIM with eta = 0, Euler, flow Euler) so that the last step is a function
    of its input alone. ``generator``: the re-noising's noise."""

    gives_latent_gradient: ClassVar[bool] = False

    def __init__(self, n: int = 2, generator: torch.Generator | None = None):
        self.n, self.generator = check_int("n", n, minimum=1), generator

    @classmethod
    def for_weights(cls, *, steps, generator=None, k=1):
        return cls(generator=generator)

    def select(self, steps):
        return {steps.stop - 1}

    def run(self, chain, x, state, steps):
        if isinstance(chain.solver, DPMSolverPP) or any(chain.solver.noise_steps()):
            raise UsageError(f"draft-lv re-runs the last step from a re-noised sample; {type(chain.solver).__name__} "
                             "is multistep or stochastic: use DDIM (eta = 0), Euler or flow Euler", "strategy")
        last = steps.stop - 1
        with torch.no_grad():
            for i in range(steps.start, steps.stop):
                x, state = chain.step(i, x, state)
        (a, s), _ = chain.solver.levels(last)
        copies = []
        for _ in range(self.n):
            eps = torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.device, x.dtype)
            copies.append(chain.step(last, a * x + s * eps, state)[0])
        return torch.cat(copies)


@register_strategy("direct-align")
class DirectAlign(Strategy):
    """Direct-Align (Shen et al., 2025, "Directly Aligning the Full Diffusion Trajectory with Fine-Grained Human
    Preference", the denoising branch of SRPO's Direct-Align): the whole chain runs without a graph to x0; a step
    ``t`` is drawn uniformly among all of the chain's steps (or the share ``[low, high)`` of them), known noise eps
    is injected at that step's input level, x_t = a_t x0 + s_t eps, and one deterministic step runs with its graph,
    x_{t+1} = (the DDIM move, :meth:`~sdo.solvers.Solver.jump`, of the denoiser call at x_t); the image is then
    recovered with the same known noise,

        x0_hat = (x_{t+1} - s_{t+1} eps) / a_{t+1}        (the last step: s = 0, a = 1, x0_hat = x_{t+1}),

    rather than from the model's own noise estimate as ReFL's x0 prediction does: SRPO's reason it trains early,
    very noisy steps stably. Not implemented: SRPO's inversion branch, its discounted sum over several injections,
    and its positive/negative prompt pair (a reward-side choice). ``generator``: the step and the noise."""

    gives_latent_gradient: ClassVar[bool] = False

    def __init__(self, low: float = 0.0, high: float = 1.0, generator: torch.Generator | None = None):
        if not 0.0 <= float(low) < float(high) <= 1.0:
            raise UsageError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
        self.low, self.high, self.generator = float(low), float(high), generator

    @classmethod
    def for_weights(cls, *, steps, generator=None, k=1):
        return cls(generator=generator)

    def select(self, steps):
        first = steps.start + int(self.low * len(steps))
        last = min(max(first, steps.start + math.ceil(self.high * len(steps)) - 1), steps.stop - 1)
        return {randint(min(first, last), last, self.generator)}

    def run(self, chain, x, state, steps):
        (t,) = self.select(steps)
        with torch.no_grad():
            for i in range(steps.start, steps.stop):
                x, state = chain.step(i, x, state)
        solver = chain.solver
        (a, s), (a_next, s_next) = solver.levels(t)
        eps = torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.device, x.dtype)
        noised = a * x + s * eps
        moved = solver.jump(t, t + 1, noised, chain.denoise(t, noised))
        return (moved - s_next * eps) / a_next
