"""One-step (training-free) guidance: FreeDoM (Yu et al., ICCV 2023) and Universal Guidance (UGD; Bansal et al.,
2023), the baselines of the SDO paper's Tables 2 and 4.

At every guided step the objective is evaluated on the one-step (Tweedie) estimate of the clean sample,
x0_hat(x_i), and the solver's update is corrected by the gradient of that loss with respect to x_i::

    x_{i+1} = S_i(x_i, D_i(x_i)) - rho_i * grad_{x_i} J(x0_hat(x_i))

With ``time_travel = r > 1`` (FreeDoM's time-travel strategy, UGD's recurrence) the step is repeated r times,
each time after re-noising x_{i+1} back to step i's noise level,
``x_i = (alpha_i / alpha_{i+1}) x_{i+1} + sqrt(sigma_i^2 - (alpha_i / alpha_{i+1})^2 sigma_{i+1}^2) z``.
Guidance changes the sample, not a latent: it costs one denoiser backward per guided step and per repeat, and
nothing carries over to the next sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .chain import Chain, step_range
from .checks import UsageError

__all__ = ["Guidance", "guided_run", "guided_sample"]


@dataclass
class Guidance:
    """Settings of one-step guidance; pass as ``sdo.guided_sample(chain, x, Guidance(objective, ...))``."""

    objective: Callable[[torch.Tensor], torch.Tensor]  # x0_hat -> loss per sample (or a scalar)
    scale: float | Callable[[int], float] = 1.0  # rho_i: a constant, or a function of the step index i
    time_travel: int = 1  # r: how many times each guided step is taken (r - 1 re-noisings)
    steps: range | None = None  # which step indices are guided (default: all that run)
    progress: bool = False  # tqdm bar over the steps

    def __post_init__(self):
        if not callable(self.objective):
            raise TypeError("Guidance.objective must be callable: x0_hat -> loss")
        if isinstance(self.time_travel, bool) or int(self.time_travel) != self.time_travel or self.time_travel < 1:
            raise UsageError(f"time_travel must be an int >= 1, got {self.time_travel!r}")

    def rho(self, i: int) -> float:
        return float(self.scale(i)) if callable(self.scale) else float(self.scale)


def _loss_gradient(chain, i: int, x: torch.Tensor, objective) -> tuple[torch.Tensor, torch.Tensor]:
    """(model output, grad_x J(x0_hat(x))) at step i."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = chain.denoise(i, x)
        loss = objective(chain.solver.denoised(i, x, out))
        if not torch.is_tensor(loss) or not loss.requires_grad:
            raise UsageError("the guidance objective does not depend on x0_hat (no gradient); check for detach/no_grad")
        if not bool(torch.isfinite(loss).all()):
            raise FloatingPointError(f"guidance objective is not finite at step {i}")
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return out.detach(), grad


def _renoise(chain, i: int, x_next: torch.Tensor, generator) -> torch.Tensor:
    """Diffuse a latent at the level after step i back to step i's level (the forward process q)."""
    (a_in, s_in), (a_out, s_out) = chain.solver.levels(i)
    ratio = a_in / a_out
    std = math.sqrt(max(s_in**2 - (ratio * s_out) ** 2, 0.0))
    z = randn_tensor(x_next.shape, generator=generator, device=x_next.device, dtype=x_next.dtype)
    return ratio * x_next + std * z


def guided_run(chain, x: torch.Tensor, state, steps: range, guidance: Guidance, generator=None) -> torch.Tensor:
    """Run ``steps`` of ``chain`` from ``x`` with one-step guidance; the result carries no graph."""
    guided = steps if guidance.steps is None else guidance.steps
    x = x.detach()
    for i in tqdm(steps, desc="guided sampling", disable=not guidance.progress):
        if i not in guided:
            with torch.no_grad():
                x, state = chain.step(i, x, state)
            continue
        for r in range(guidance.time_travel):
            out, grad = _loss_gradient(chain, i, x, guidance.objective)
            with torch.no_grad():
                x_next, state_next = chain.update(i, x, out, state)
                x_next = x_next - guidance.rho(i) * grad
            if r + 1 < guidance.time_travel:
                x = _renoise(chain, i, x_next, generator)
        x, state = x_next, state_next
    return x


def guided_sample(chain: Chain, x: torch.Tensor, guidance: Guidance, *, start: int = 0, stop: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Run steps ``start..stop-1`` of ``chain`` from ``x`` with one-step guidance (FreeDoM / UGD, :class:`Guidance`):
    a forward sampler whose result carries no graph (for a differentiable run, :func:`sdo.sample`). ``generator``
    draws the solver's noise, then the time-travel noise."""
    if not isinstance(guidance, Guidance):
        raise TypeError(f"guidance must be an sdo.Guidance, got {type(guidance).__name__}")
    steps = step_range(chain, start, stop)
    chain.check(x)
    return guided_run(chain, x, chain.init_state(x, generator), steps, guidance, generator)
