"""DDIM inversion (Song et al., 2021, Sec. 4.3; as used for real-image editing by Mokady et al., 2023): the
latent at an intermediate step whose deterministic sampling gives back a given image, found by running the
chain's probability-flow ODE backwards with its own solver. The continuous adjoint rebuilds its states the
same way (:mod:`sdo.gradients.adjoint`)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch

from .chain import Chain, step_range
from .checks import UsageError

__all__ = ["check_ode", "invert", "rebuild", "rebuilt_states"]


def check_ode(chain: Chain, steps: range, who: str) -> None:
    """Raise unless ``steps`` of ``chain`` are deterministic one-step updates that can be inverted."""
    solver = chain.solver
    if not solver.invertible:
        raise UsageError(f"{who} inverts solver steps, but {type(solver).__name__}'s cannot be inverted "
                         f"({solver.not_invertible_reason()})")
    stochastic = solver.noise_steps()
    noisy = [i for i in steps if stochastic[i]]
    if noisy:
        raise UsageError(
            f"{who} runs the probability-flow ODE backwards, but {type(solver).__name__} adds noise at steps "
            f"{noisy[:3]}{'...' if len(noisy) > 3 else ''}; use a deterministic solver (DDIM eta=0, "
            "DPM-Solver++ order 1, Euler)"
        )


def rebuild(chain: Chain, i: int, x_next: torch.Tensor, out_next: torch.Tensor | None, state) -> torch.Tensor:
    """x_i from x_{i+1}: step i inverted with the denoiser evaluated at x_{i+1} at its own noise level, i.e. the
    output of step i+1 at x_{i+1} (an explicit Euler step of the probability-flow ODE run backwards). After the
    chain's last step, where no step follows, step i's own timestep stands in (as DDIM inversion does)."""
    with torch.no_grad():
        if out_next is None:
            out_next = chain.denoise(min(i + 1, len(chain) - 1), x_next)
        return chain.solver.invert(i, x_next, out_next, state)


def rebuilt_states(chain: Chain, x_end: torch.Tensor, steps: range, state) -> Iterator[tuple[int, torch.Tensor]]:
    """``(i, x_i)`` for i in reversed ``steps``, each rebuilt from the one after it (one denoiser call each)."""
    x, out = x_end, None
    for i in reversed(steps):
        x = rebuild(chain, i, x, out, state)
        yield i, x
        if i > steps.start:
            with torch.no_grad():
                out = chain.denoise(i, x)


def invert(chain: Chain, x0: torch.Tensor, start: int = 0) -> torch.Tensor:
    """The latent at step ``start`` from which ``sample(chain, latent, start=start)`` gives back ``x0``
    (approximately: see :func:`sdo.sampling.round_trip_error`). ``start`` is the step to edit from: the paper starts
    style and aesthetic tasks at t ~ 600 of 1000."""
    steps = step_range(chain, start)
    chain.check(x0)
    check_ode(chain, steps, "invert()")
    (_, latent), = deque(rebuilt_states(chain, x0, steps, chain.init_state(x0)), maxlen=1)
    return latent
