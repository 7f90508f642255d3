"""The solver contract: ``solver.step(i, x, model_out, state) -> (x_next, state)``, pure, with the run's changing
parts (multistep history, the noise of stochastic solvers) in a frozen :class:`SolverState`; and the helpers every
family shares (the x0/eps prediction of a model output, refusing config values not implemented)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..checks import UsageError

__all__ = ["Solver", "SolverState", "predict", "reject"]


@dataclass(frozen=True)
class SolverState:
    """Everything that changes along one run of a chain; never mutated, only replaced."""

    noise: tuple[torch.Tensor | None, ...] = ()  # per-step noise of stochastic solvers, drawn once per run
    history: tuple[torch.Tensor, ...] = ()  # multistep memory: data predictions of the preceding steps


class Solver:
    """Base class: ``step(i, x, model_out, state) -> (x_next, state)``, with no state of its own."""

    timesteps: torch.Tensor  # the model's timestep for each step (CPU tensor, as the scheduler gives it)
    init_noise_sigma: float = 1.0  # scale of x_T (pipelines multiply unit noise by it)
    num_train_timesteps: int = 1000  # the model's training schedule: timesteps lie in [0, num_train_timesteps]
    noise_dtype: torch.dtype | None = None  # dtype the scheduler draws its noise in (None: the latent's)

    def __len__(self) -> int:
        return len(self.timesteps)

    def model_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The denoiser's input at step ``i`` (the scheduler's ``scale_model_input``)."""
        return x

    def noise_steps(self) -> list[bool]:
        """For each step, whether the scheduler draws noise there."""
        return [False] * len(self)

    def init_state(self, x: torch.Tensor, generator: torch.Generator | None = None) -> SolverState:
        """State at the start of a run: the noise of every stochastic step, drawn in step order."""
        noise = tuple(
            randn_tensor(x.shape, generator=generator, device=x.device, dtype=self.noise_dtype or x.dtype)
            if needed
            else None
            for needed in self.noise_steps()
        )
        return SolverState(noise=noise)

    def step(self, i: int, x: torch.Tensor, model_out: torch.Tensor, state: SolverState):
        raise NotImplementedError

    def denoised(self, i: int, x: torch.Tensor, model_out: torch.Tensor) -> torch.Tensor:
        """The one-step (Tweedie) estimate of the clean sample at step ``i``, x0_hat(x_i)."""
        raise NotImplementedError

    def levels(self, i: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """``((alpha_in, sigma_in), (alpha_out, sigma_out))``: step ``i`` maps latents distributed as
        ``alpha_in x0 + sigma_in eps`` to ones distributed as ``alpha_out x0 + sigma_out eps``."""
        raise NotImplementedError

    def jump(self, i: int, j: int, x: torch.Tensor, model_out: torch.Tensor) -> torch.Tensor:
        """The latent before step ``j`` (``j == len(self)``: the sample) reached from the latent ``x`` before step
        ``i`` in one deterministic DDIM move with the model output of step ``i``: x_j = alpha_j x0 + sigma_j eps,
        (x0, eps) read off ``x`` at step i's noise level (Song et al., 2021, Eq. 12 with eta = 0). This is how
        trajectory-preserving few-step models (TCD with gamma = 0, Hyper-SD, PCM) cross a segment; with
        ``j = i + 1`` it equals a deterministic first-order :meth:`step` (DDIM, Euler, flow Euler)."""
        self.check_index(i)
        if not i < j <= len(self):
            raise UsageError(f"a jump goes forward: need {i} < j <= {len(self)}, got j={j}")
        (alpha, sigma), _ = self.levels(i)
        alpha_j, sigma_j = self.levels(j)[0] if j < len(self) else self.levels(j - 1)[1]
        x0 = self.denoised(i, x, model_out)
        return alpha_j * x0 + sigma_j * ((x - alpha * x0) / sigma)

    #: whether :meth:`invert` applies: the update is affine in x for a fixed model output and reads no history
    invertible: bool = True

    def invert(self, i: int, x_next: torch.Tensor, model_out: torch.Tensor, state: SolverState) -> torch.Tensor:
        """The x with ``step(i, x, model_out, state)[0] == x_next``, for a *given* model output.

        One-step updates are affine in x once the model output is fixed, ``x_next = a x + b``; ``a`` and ``b``
        are read off two evaluations of :meth:`step` (at x = 0 and x = 1), so every solver inverts with its own
        formula. This is what DDIM inversion, the continuous adjoint and EDICT's inverse need.
        """
        if not self.invertible:
            raise UsageError(
                f"{type(self).__name__} steps cannot be inverted here: {self.not_invertible_reason()}"
            )
        b = self.step(i, torch.zeros_like(x_next), model_out, state)[0]
        a = self.step(i, torch.ones_like(x_next), model_out, state)[0] - b
        if bool((a == 0).any()):
            raise UsageError(f"step {i} of {type(self).__name__} does not depend on x (its update discards x); "
                             "it cannot be inverted")
        return (x_next - b) / a

    def not_invertible_reason(self) -> str:
        """Why :meth:`invert` does not apply, for the error that says so (when ``invertible`` is False)."""
        return "its update is not affine in x"

    def check_index(self, i: int) -> None:
        if not 0 <= i < len(self):
            raise IndexError(f"step index {i} out of range for a {len(self)}-step {type(self).__name__}")

    def _noise(self, i: int, state: SolverState, x: torch.Tensor) -> torch.Tensor:
        if len(state.noise) != len(self) or state.noise[i] is None:
            raise UsageError(
                f"step {i} of {type(self).__name__} is stochastic but the state carries no noise for it; "
                "start runs from solver.init_state(x, generator)"
            )
        return state.noise[i].to(x.dtype)


def predict(kind: str, out: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float):
    """(x0, eps) from a model output, for x = alpha * x0 + sigma * eps (Ho et al.; Salimans & Ho for v)."""
    if kind == "epsilon":
        return (x - sigma * out) / alpha, out
    if kind == "sample":
        return out, (x - alpha * out) / sigma
    if kind == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    raise UsageError(f"prediction_type {kind!r} is not supported; use 'epsilon', 'sample' or 'v_prediction'")


def reject(scheduler, **unsupported) -> None:
    """Raise for config values this module does not implement, instead of silently ignoring them."""
    for key, allowed in unsupported.items():
        value = scheduler.config.get(key, allowed[0])
        if value not in allowed:
            raise UsageError(
                f"{type(scheduler).__name__} with {key}={value!r} is not supported (supported: {list(allowed)})"
            )
