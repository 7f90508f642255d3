"""``sample``: run a chain from a latent, differentiable as the chosen strategy allows."""

from __future__ import annotations

import warnings

import torch

from .chain import Chain, step_range
from .checks import UsageError
from .gradients import Strategy, check_latent_gradient, get_strategy
from .guidance import Guidance, guided_sample
from .inversion import invert

__all__ = ["round_trip_error", "sample"]


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

    ``guidance``: deprecated, use :func:`sdo.guided_sample` (one-step guidance is a different sampler, whose
    result carries no graph); kept for one release.
    """
    if guidance is not None:
        warnings.warn("sdo.sample(..., guidance=) is now sdo.guided_sample(chain, x, guidance); the keyword goes "
                      "away in the next release", DeprecationWarning, stacklevel=2)
        if strategy is not None:
            raise UsageError("guidance sampling takes no strategy: its sample is not differentiable")
        return guided_sample(chain, x, guidance, start=start, stop=stop, generator=generator)
    steps = step_range(chain, start, stop)
    chain.check(x)
    strategy = get_strategy("full" if strategy is None else strategy)
    if torch.is_grad_enabled() and x.requires_grad:
        check_latent_gradient(strategy)
    state = chain.init_state(x, generator)
    return strategy.run(chain, x, state, steps)


def round_trip_error(chain: Chain, x0: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Per item, ``|sample(invert(x0)) - x0| / |x0|``: how much of the image inversion loses."""
    latent = invert(chain, x0, start)
    with torch.no_grad():
        back = sample(chain, latent, start=start)
    return (back - x0).flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1)
