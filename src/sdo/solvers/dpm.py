"""DPM-Solver++ (Lu et al., 2022): the multistep solver of diffusers' DPMSolverMultistepScheduler, its history in
the state."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..checks import UsageError
from .base import Solver, predict, reject

__all__ = ["DPMSolverPP"]


class DPMSolverPP(Solver):
    """DPM-Solver++ (Lu et al., 2022), multistep, 1st or 2nd order (Algorithm 2), with diffusers' final-step rules.

    The data prediction of the previous step is carried in ``state.history``; a run's first step, or a step
    whose predecessor did not run, is first order, as in a scheduler loop started there.
    """

    def __init__(self, scheduler):
        cfg = scheduler.config
        reject(
            scheduler,
            algorithm_type=("dpmsolver++",),
            solver_order=(2, 1),
            solver_type=("midpoint", "heun"),
            thresholding=(False,),
            variance_type=(None,),
        )
        self.timesteps = scheduler.timesteps.clone()
        self.prediction_type = cfg.prediction_type
        self.order, self.heun = cfg.solver_order, cfg.solver_type == "heun"
        self.flow = bool(cfg.get("use_flow_sigmas", False))
        if (self.prediction_type == "flow_prediction") != self.flow:
            raise UsageError("DPMSolverMultistepScheduler: flow_prediction goes with use_flow_sigmas=True")
        self.sigmas = scheduler.sigmas.double().tolist()
        n = len(self.timesteps)
        self._final_first_order = cfg.euler_at_final or (cfg.lower_order_final and n < 15) or (
            cfg.final_sigmas_type == "zero"
        )

    def _alpha_sigma(self, s: float):
        if self.flow:
            return 1.0 - s, s
        alpha = 1.0 / math.sqrt(s * s + 1.0)
        return alpha, s * alpha

    def _lambda(self, s: float) -> float:
        alpha, sigma = self._alpha_sigma(s)
        return math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)

    @property
    def invertible(self) -> bool:
        return self.order == 1

    def not_invertible_reason(self) -> str:
        return "second-order steps read the previous step's prediction; use solver_order=1"

    def levels(self, i):
        self.check_index(i)
        return self._alpha_sigma(self.sigmas[i]), self._alpha_sigma(self.sigmas[i + 1])

    def denoised(self, i, x, model_out):
        return self.data_prediction(i, x, model_out)

    def data_prediction(self, i: int, x: torch.Tensor, model_out: torch.Tensor) -> torch.Tensor:
        """The scheduler's ``convert_model_output``: x0 predicted at step i."""
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        if self.prediction_type == "flow_prediction":
            return x - self.sigmas[i] * model_out
        return predict(self.prediction_type, model_out, x, alpha, sigma)[0]

    def step(self, i, x, model_out, state):
        self.check_index(i)
        m0 = self.data_prediction(i, x, model_out)
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        _, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        h = self._lambda(self.sigmas[i + 1]) - self._lambda(self.sigmas[i])
        phi = math.expm1(-h) if math.isfinite(h) else -1.0  # exp(-h) - 1
        first = self.order == 1 or not state.history or (i == len(self) - 1 and self._final_first_order)
        x_next = (sigma_t / sigma_s0) * x - (alpha_t * phi) * m0  # Eq. (8) of DPM-Solver++
        if not first:
            r0 = (self._lambda(self.sigmas[i]) - self._lambda(self.sigmas[i - 1])) / h
            d1 = (1.0 / r0) * (m0 - state.history[-1])
            if self.heun:
                x_next = x_next + (alpha_t * (phi / h + 1.0)) * d1
            else:
                x_next = x_next - (0.5 * alpha_t * phi) * d1
        return x_next, replace(state, history=(m0,))
