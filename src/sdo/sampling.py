"""``sample``: run a chain from a latent, differentiable as the chosen strategy allows."""

from __future__ import annotations

import torch

from .chain import Chain
from .checks import UsageError
from .guidance import Guidance, guided_run
from .strategies import Strategy, get_strategy

__all__ = ["sample", "step_range"]


def step_range(chain: Chain, start: int = 0, stop: int | None = None) -> range:
    """The steps ``start..stop-1`` of ``chain``, checked: a clear error instead of an empty or short run."""
    n = len(chain)
    stop = n if stop is None else stop
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int step index, got {value!r}")
    if not 0 <= start < n:
        raise UsageError(f"start={start} is out of range: the chain has {n} steps (valid: 0..{n - 1})")
    if not start < stop <= n:
        raise UsageError(f"stop={stop} is out of range: need start < stop <= {n} (start={start})")
    return range(start, stop)


def sample(
    chain: Chain,
    x: torch.Tensor,
    *,
    strategy: str | Strategy | None = None,
    start: int = 0,
    stop: int | None = None,
    generator: torch.Generator | None = None,
    guidance: Guidance | None = None,
) -> torch.Tensor:
    """Run steps ``start..stop-1`` of ``chain`` from ``x`` and return the latent after them (the sample x0
    when ``stop`` is None), differentiable with respect to ``x`` and the model's parameters as ``strategy``
    allows (default ``"full"``).

    ``x`` is the latent exactly as a hand-written diffusers loop holds it before step ``start`` (for Euler-type
    schedulers, unit noise times ``chain.init_noise_sigma``). ``generator`` draws the noise of stochastic
    solvers, once per call and for all steps in order, so one seed gives one trajectory. This function never
    disables gradients itself: wrap it in ``torch.no_grad()`` for plain sampling.

    ``guidance``: one-step guidance (FreeDoM / UGD, :class:`~sdo.Guidance`) instead of a differentiable run;
    the sample it returns carries no graph, and time-travel noise comes from ``generator`` after the solver's.
    """
    steps = step_range(chain, start, stop)
    chain.check(x)
    if guidance is not None:
        if strategy is not None:
            raise UsageError("guidance sampling takes no strategy: its sample is not differentiable")
        if not isinstance(guidance, Guidance):
            raise TypeError(f"guidance must be an sdo.Guidance, got {type(guidance).__name__}")
        return guided_run(chain, x, chain.init_state(x, generator), steps, guidance, generator)
    strategy = get_strategy("full" if strategy is None else strategy)
    state = chain.init_state(x, generator)
    return strategy.run(chain, x, state, steps)
