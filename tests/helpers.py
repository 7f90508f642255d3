"""Shared test pieces: small models, scheduler cases, and hand-written diffusers reference loops."""

from __future__ import annotations

import math

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)
from torch import nn

# (id, scheduler factory, Chain.from_diffusers kwargs, scheduler.step kwargs)
SCHEDULER_CASES = [
    ("ddim", lambda: DDIMScheduler(clip_sample=False), {}, {}),
    ("ddim-v-trailing",
     lambda: DDIMScheduler(clip_sample=False, prediction_type="v_prediction", timestep_spacing="trailing"), {}, {}),
    # x0-prediction: with alpha_prev = 1 at the last step there is no skip path there (see test_latent)
    ("ddim-sample-pred",
     lambda: DDIMScheduler(clip_sample=False, prediction_type="sample", set_alpha_to_one=False), {}, {}),
    ("ddim-eta", lambda: DDIMScheduler(clip_sample=False), {"eta": 0.6}, {"eta": 0.6}),
    ("ddpm", lambda: DDPMScheduler(clip_sample=False), {}, {}),
    ("ddpm-v-large",
     lambda: DDPMScheduler(clip_sample=False, prediction_type="v_prediction", variance_type="fixed_large"), {}, {}),
    ("dpm2-midpoint", lambda: DPMSolverMultistepScheduler(), {}, {}),
    ("dpm2-heun-sigmamin",
     lambda: DPMSolverMultistepScheduler(solver_type="heun", lower_order_final=False, final_sigmas_type="sigma_min"),
     {}, {}),
    ("dpm1-v", lambda: DPMSolverMultistepScheduler(solver_order=1, prediction_type="v_prediction"), {}, {}),
    ("dpm2-euler-final-karras",
     lambda: DPMSolverMultistepScheduler(euler_at_final=True, use_karras_sigmas=True), {}, {}),
    ("dpm2-sample-pred",
     lambda: DPMSolverMultistepScheduler(prediction_type="sample", lower_order_final=False,
                                         final_sigmas_type="sigma_min"),
     {}, {}),
    ("euler", lambda: EulerDiscreteScheduler(), {}, {}),
    ("euler-v-karras", lambda: EulerDiscreteScheduler(prediction_type="v_prediction", use_karras_sigmas=True), {}, {}),
    ("flow-euler-shift", lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), {}, {}),
    ("flow-euler-stochastic", lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), {}, {}),
    ("lcm", lambda: LCMScheduler(), {}, {}),
    ("lcm-v", lambda: LCMScheduler(prediction_type="v_prediction"), {}, {}),
]
CASE_IDS = [c[0] for c in SCHEDULER_CASES]


class TinyNet(nn.Module):
    """A small nonlinear, timestep-dependent convolutional denoiser with parameters (fast on CPU)."""

    def __init__(self, channels: int = 2, hidden: int = 6, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.temb = nn.Linear(1, hidden)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x, timestep):
        t = (timestep.to(x.dtype) / 1000.0).reshape(-1, 1)
        h = torch.tanh(self.conv1(x) + self.temb(t)[:, :, None, None])
        return 0.5 * self.conv2(h) + 0.1 * x


def reference_loop(model, scheduler, num_steps, x, *, grad_steps=None, start=0, generator=None, step_kwargs=None):
    """The hand-written diffusers loop of the SDO paper's Fig. 4: a fresh, stateful scheduler; only the
    ``model(...)`` call sits under ``torch.set_grad_enabled(i in grad_steps)``; ``scheduler.step`` keeps its
    graph. ``grad_steps=None`` keeps every model graph (plain backpropagation)."""
    scheduler.set_timesteps(num_steps)
    if start and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    for i, t in enumerate(scheduler.timesteps):
        if i < start:
            continue
        keep = grad_steps is None or i in grad_steps
        model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        with torch.set_grad_enabled(keep):
            out = model(model_in, t.reshape(1).expand(x.shape[0]))
        x = scheduler.step(out, t, x, generator=generator, **(step_kwargs or {})).prev_sample
    return x


def alphas_cumprod(scheduler) -> list[float]:
    return scheduler.alphas_cumprod.double().tolist()


class GaussianEps(nn.Module):
    """Exact noise prediction for Gaussian data x0 ~ N(mu, s0^2 I): with x_t = sqrt(a) x0 + sqrt(1-a) eps,
    E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / (a s0^2 + 1 - a): linear in x_t, so the chain is affine."""

    def __init__(self, alphas: list[float], mu: float = 0.3, s0: float = 0.7):
        super().__init__()
        self.alphas = alphas
        self.mu = nn.Parameter(torch.tensor(mu, dtype=torch.float64))
        self.s0 = s0

    def slope(self, t: int) -> float:
        a = self.alphas[t]
        return math.sqrt(1 - a) / (a * self.s0**2 + 1 - a)

    def forward(self, x, timestep):
        a = torch.tensor([self.alphas[int(t)] for t in timestep], dtype=x.dtype).view(-1, *[1] * (x.ndim - 1))
        return torch.sqrt(1 - a) * (x - torch.sqrt(a) * self.mu) / (a * self.s0**2 + 1 - a)


class GaussianFlow(nn.Module):
    """Exact rectified-flow velocity for Gaussian data: x_s = (1-s) x0 + s e, v = e - x0,
    E[v | x_s] = -mu + k(s) (x_s - (1-s) mu), k(s) = (s - (1-s) s0^2) / ((1-s)^2 s0^2 + s^2)."""

    def __init__(self, mu: float = 0.3, s0: float = 0.7):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu, dtype=torch.float64))
        self.s0 = s0

    def slope(self, s: float) -> float:
        return (s - (1 - s) * self.s0**2) / ((1 - s) ** 2 * self.s0**2 + s**2)

    def forward(self, x, timestep):
        out = []
        for b, t in enumerate(timestep.tolist()):
            s = t / 1000.0
            out.append(-self.mu + self.slope(s) * (x[b] - (1 - s) * self.mu))
        return torch.stack(out)
