"""Euler solvers on a sigma schedule: EulerDiscreteScheduler (k-diffusion's Euler) and flow matching's Euler."""

from __future__ import annotations

import math

import torch

from ..checks import UsageError
from .base import Solver

__all__ = ["EulerSolver", "FlowEulerSolver"]


class EulerSolver(Solver):
    """Euler step of the probability-flow ODE in sigma space (Karras et al., 2022, Algorithm 1 without churn)."""

    def __init__(self, scheduler):
        self.timesteps = scheduler.timesteps.clone()
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample", "original_sample"):
            raise UsageError(f"EulerDiscreteScheduler with prediction_type {self.prediction_type!r} is not supported")
        self.sigmas = scheduler.sigmas.double().tolist()

    def model_input(self, i, x):
        return x / math.sqrt(self.sigmas[i] ** 2 + 1)

    def levels(self, i):
        self.check_index(i)
        return (1.0, self.sigmas[i]), (1.0, self.sigmas[i + 1])

    def denoised(self, i, x, model_out):
        sigma = self.sigmas[i]
        if self.prediction_type == "epsilon":
            return x - sigma * model_out
        if self.prediction_type == "v_prediction":
            return model_out * (-sigma / math.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
        return model_out

    def step(self, i, x, model_out, state):
        self.check_index(i)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = self.denoised(i, x, model_out)
        return x + (x - x0) / sigma * (sigma_next - sigma), state


class FlowEulerSolver(Solver):
    """Euler step of a rectified-flow ODE, x_next = x + (sigma_next - sigma) v (Lipman et al., 2023; the
    paper's Eq. 5); with ``stochastic_sampling`` it re-noises the x0 prediction to sigma_next instead."""

    noise_dtype = torch.float32

    def __init__(self, scheduler):
        self.timesteps = scheduler.timesteps.clone()
        self.sigmas = scheduler.sigmas.double().tolist()
        self.stochastic = bool(scheduler.config.get("stochastic_sampling", False))

    def noise_steps(self):
        return [self.stochastic] * len(self)

    def levels(self, i):
        self.check_index(i)
        s0, s1 = self.sigmas[i], self.sigmas[i + 1]
        return (1.0 - s0, s0), (1.0 - s1, s1)

    def denoised(self, i, x, model_out):
        return x - self.sigmas[i] * model_out

    def step(self, i, x, model_out, state):
        self.check_index(i)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        if self.stochastic:
            x0 = x - sigma * model_out
            return (1.0 - sigma_next) * x0 + sigma_next * self._noise(i, state, x), state
        return x + (sigma_next - sigma) * model_out, state
