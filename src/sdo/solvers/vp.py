"""Discrete variance-preserving solvers: DDIM (with eta), DDPM and LCM, on a diffusers scheduler's alpha-bar table."""

from __future__ import annotations

import math
import warnings

import torch

from ..checks import check_number
from .base import Solver, predict, reject

__all__ = ["DDIMSolver", "DDPMSolver", "LCMSolver"]


class _DiscreteVP(Solver):
    """Shared part of DDIM, DDPM and LCM: discrete timesteps on a variance-preserving schedule,
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, and the (optionally clipped) x0/eps prediction of step i."""

    def __init__(self, scheduler, **unsupported):
        reject(scheduler, thresholding=(False,), **unsupported)
        self.timesteps = scheduler.timesteps.clone()
        self.prediction_type = scheduler.config.prediction_type
        self.alphas_cumprod = scheduler.alphas_cumprod.double().tolist()  # float32 table, read in float64
        a = [self.alphas_cumprod[t] for t in self.timesteps.tolist()]
        self._alpha_sigma = [(math.sqrt(a_t), math.sqrt(1 - a_t)) for a_t in a]
        self.clip = None
        if scheduler.config.get("clip_sample", False):
            self.clip = float(scheduler.config.clip_sample_range)
            warnings.warn(
                f"{type(scheduler).__name__} has clip_sample=True: predicted x0 is clamped to +-{self.clip} and "
                "gradients are zero wherever the clamp is active; build the scheduler with clip_sample=False for "
                "gradient-based optimization",
                stacklevel=4,
            )

    @property
    def invertible(self) -> bool:
        return self.clip is None

    def not_invertible_reason(self) -> str:
        return "clip_sample clamps the x0 prediction, so the update is not affine in x"

    def denoised(self, i, x, model_out):
        return self.predict(i, x, model_out)[0]

    def levels(self, i):
        self.check_index(i)
        return self._levels[i]

    def _set_levels(self, a_out: list[float]) -> None:
        """Marginal levels from alpha-bar at each step and alpha-bar after it."""
        a_in = [self.alphas_cumprod[t] for t in self.timesteps.tolist()]
        self._levels = [
            ((math.sqrt(a), math.sqrt(1 - a)), (math.sqrt(b), math.sqrt(max(1 - b, 0.0))))
            for a, b in zip(a_in, a_out, strict=True)
        ]

    def predict(self, i: int, x: torch.Tensor, model_out: torch.Tensor):
        """(x0, eps) at step i, x0 clipped as the scheduler's ``clip_sample`` says (eps from the unclipped x0)."""
        x0, eps = predict(self.prediction_type, model_out, x, *self._alpha_sigma[i])
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return x0, eps


class DDIMSolver(_DiscreteVP):
    """DDIM (Song et al., 2021, Eq. 12): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z."""

    def __init__(self, scheduler, eta: float = 0.0):
        super().__init__(scheduler)
        self.eta = check_number("eta", eta, minimum=0, maximum=1)  # sigma_t needs eta <= 1 (Eq. 16)
        ac, final = self.alphas_cumprod, float(scheduler.final_alpha_cumprod)
        stride = scheduler.config.num_train_timesteps // len(self.timesteps)
        self._coef, a_out = [], []
        for t in self.timesteps.tolist():
            a, prev = ac[t], t - stride  # diffusers' rule: prev = t - T // N, not the next timestep
            a_prev = ac[prev] if prev >= 0 else final
            std = self.eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
            self._coef.append((math.sqrt(a_prev), math.sqrt(1 - a_prev - std**2), std))
            a_out.append(a_prev)
        self._set_levels(a_out)

    def noise_steps(self):
        return [self.eta > 0] * len(self)

    def step(self, i, x, model_out, state):
        self.check_index(i)
        alpha_prev, dir_coef, std = self._coef[i]
        x0, eps = self.predict(i, x, model_out)
        x_next = alpha_prev * x0 + dir_coef * eps
        if self.eta > 0:
            x_next = x_next + std * self._noise(i, state, x)
        return x_next, state


class DDPMSolver(_DiscreteVP):
    """Ancestral DDPM step (Ho et al., 2020, Eqs. 6-7) on the scheduler's timestep subset."""

    def __init__(self, scheduler):
        super().__init__(scheduler, variance_type=("fixed_small", "fixed_small_log", "fixed_large"))
        ac, ts = self.alphas_cumprod, self.timesteps.tolist()
        large = scheduler.config.variance_type == "fixed_large"
        self._coef, a_out = [], []
        for i, t in enumerate(ts):
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            a, a_prev = ac[t], (ac[prev] if prev >= 0 else 1.0)
            a_out.append(a_prev)
            beta = 1 - a / a_prev
            var = beta if large else max((1 - a_prev) / (1 - a) * beta, 1e-20)
            c_x0 = math.sqrt(a_prev) * beta / (1 - a)
            c_x = math.sqrt(a / a_prev) * (1 - a_prev) / (1 - a)
            self._coef.append((c_x0, c_x, math.sqrt(var)))
        self._stochastic = [t > 0 for t in ts]
        self._set_levels(a_out)

    def noise_steps(self):
        return list(self._stochastic)

    def step(self, i, x, model_out, state):
        self.check_index(i)
        c_x0, c_x, std = self._coef[i]
        x_next = c_x0 * self.predict(i, x, model_out)[0] + c_x * x
        if self._stochastic[i]:
            x_next = x_next + std * self._noise(i, state, x)
        return x_next, state


class LCMSolver(_DiscreteVP):
    """Multistep consistency sampling (Luo et al., 2023, Algorithm 1): denoise, then re-noise to the next step."""

    def __init__(self, scheduler):
        super().__init__(scheduler)
        ac, final = self.alphas_cumprod, float(scheduler.final_alpha_cumprod)
        ts, scale, sigma_data = self.timesteps.tolist(), scheduler.config.timestep_scaling, 0.5
        a_out = []
        self._coef = []
        for i, t in enumerate(ts):
            prev = ts[i + 1] if i + 1 < len(ts) else t
            a_prev = ac[prev] if prev >= 0 else final
            a_out.append(a_prev if i + 1 < len(ts) else 1.0)  # the last step returns the denoised sample
            st = t * scale  # boundary-condition scalings c_skip(t), c_out(t) of consistency models
            c_skip = sigma_data**2 / (st**2 + sigma_data**2)
            c_out = st / math.sqrt(st**2 + sigma_data**2)
            self._coef.append((c_skip, c_out, math.sqrt(a_prev), math.sqrt(1 - a_prev)))
        self._set_levels(a_out)

    def noise_steps(self):
        return [i < len(self) - 1 for i in range(len(self))]

    def denoised(self, i, x, model_out):
        c_skip, c_out = self._coef[i][:2]
        return c_out * self.predict(i, x, model_out)[0] + c_skip * x

    def step(self, i, x, model_out, state):
        self.check_index(i)
        alpha_prev, sigma_prev = self._coef[i][2:]
        denoised = self.denoised(i, x, model_out)
        if i == len(self) - 1:
            return denoised, state
        return alpha_prev * denoised + sigma_prev * self._noise(i, state, x), state
