"""The unrolled sampling chain: a denoiser and a pure solver.

``chain.step(i, x, state)`` is one denoiser evaluation followed by one solver update. It holds no state of
its own, so any step may be re-run (checkpointing, adjoints, reversible methods) with identical results.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .checks import UsageError
from .denoiser import Denoiser
from .solvers import Solver, SolverState, solver_from_scheduler

__all__ = ["Chain", "step_range"]


class Chain:
    """``Chain(denoiser, solver)``; ``len(chain)`` steps, ``chain.timesteps`` the model's timesteps."""

    def __init__(self, denoiser, solver: Solver):
        if not isinstance(solver, Solver):
            raise TypeError(f"solver must be an sdo Solver, got {type(solver).__name__}; see solver_from_scheduler")
        self.denoiser = denoiser if isinstance(denoiser, Denoiser) else Denoiser(denoiser)
        self.solver = solver

    @classmethod
    def from_diffusers(
        cls,
        model,
        scheduler,
        num_inference_steps: int | None,
        *,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        guidance_scale: float | None = None,
        eta: float = 0.0,
        mu: float | None = None,
        sigmas=None,
    ) -> Chain:
        """A chain over a diffusers model (or any callable ``model(x, t, **cond)``) and scheduler.

        ``cond``/``uncond`` are keyword arguments for the model; ``guidance_scale`` turns on classifier-free
        guidance; ``eta`` is DDIM's stochasticity; ``mu`` and ``sigmas``, a flow-matching schedule's
        (:func:`~sdo.solvers.solver_from_scheduler`). The scheduler is not modified.
        """
        solver = solver_from_scheduler(scheduler, num_inference_steps, eta=eta, mu=mu, sigmas=sigmas)
        return cls(Denoiser(model, cond=cond, uncond=uncond, guidance_scale=guidance_scale), solver)

    def __len__(self) -> int:
        return len(self.solver)

    def __repr__(self) -> str:
        model = type(self.denoiser.model).__name__
        return f"Chain({model}, {type(self.solver).__name__}, steps={len(self)})"

    @property
    def timesteps(self) -> torch.Tensor:
        return self.solver.timesteps

    @property
    def init_noise_sigma(self) -> float:
        """Scale of the initial latent: pipelines draw unit noise and multiply by it."""
        return self.solver.init_noise_sigma

    def init_state(self, x: torch.Tensor, generator: torch.Generator | None = None) -> SolverState:
        """State for a run starting from latents like ``x``; stochastic solvers draw all their noise here."""
        return self.solver.init_state(x, generator)

    def check(self, x: torch.Tensor) -> None:
        """Raise a clear error if ``x`` cannot go through the model."""
        self.denoiser.check(x)

    def denoise(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The denoiser evaluation of step ``i``: the only part strategies keep or drop a graph for."""
        self.solver.check_index(i)
        return self.denoiser(self.solver.model_input(i, x), self.solver.timesteps[i])

    def update(self, i: int, x: torch.Tensor, model_out: torch.Tensor, state: SolverState):
        """The solver update of step ``i``: cheap, and always differentiable (the skip path of SDO)."""
        return self.solver.step(i, x, model_out, state)

    def step(self, i: int, x: torch.Tensor, state: SolverState):
        """One full step: ``(x_i, state_i) -> (x_{i+1}, state_{i+1})``."""
        return self.update(i, x, self.denoise(i, x), state)


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
