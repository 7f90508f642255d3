"""Pure solver update rules built from diffusers schedulers.

A diffusers scheduler keeps hidden step state (``_step_index``, ``model_outputs``, ``lower_order_nums``),
so re-running a step, as checkpointing, adjoint and reversible methods must, raises or silently changes the
result. A :class:`Solver` here holds only constant per-step coefficients, read once from a scheduler's
config and its ``set_timesteps`` tables; everything that changes along a run (multistep history, the noise
drawn for stochastic solvers) lives in an explicit :class:`SolverState`::

    x_{i+1}, state_{i+1} = solver.step(i, x_i, model_out_i, state_i)

Step ``i = 0`` is the first, noisiest step. The same ``(i, x, model_out, state)`` always gives the same
result. Coefficients are Python floats computed in float64 from the scheduler's (float32) tables, so a
solver runs in the dtype of its inputs; it agrees with the scheduler's own loop to that table round-off.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, replace

import torch
from diffusers.utils.torch_utils import randn_tensor

from .checks import UsageError, check_int, check_number

__all__ = [
    "SUPPORTED_SCHEDULERS",
    "DDIMSolver",
    "DDPMSolver",
    "DPMSolverPP",
    "EulerSolver",
    "FlowEulerSolver",
    "LCMSolver",
    "Solver",
    "SolverState",
    "solver_from_scheduler",
]


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
                f"{type(self).__name__} steps cannot be inverted here: {self._not_invertible_reason()}"
            )
        b = self.step(i, torch.zeros_like(x_next), model_out, state)[0]
        a = self.step(i, torch.ones_like(x_next), model_out, state)[0] - b
        if bool((a == 0).any()):
            raise UsageError(f"step {i} of {type(self).__name__} does not depend on x (its update discards x); "
                             "it cannot be inverted")
        return (x_next - b) / a

    def _not_invertible_reason(self) -> str:
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


def _predict(kind: str, out: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float):
    """(x0, eps) from a model output, for x = alpha * x0 + sigma * eps (Ho et al.; Salimans & Ho for v)."""
    if kind == "epsilon":
        return (x - sigma * out) / alpha, out
    if kind == "sample":
        return out, (x - alpha * out) / sigma
    if kind == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    raise UsageError(f"prediction_type {kind!r} is not supported; use 'epsilon', 'sample' or 'v_prediction'")


def _reject(scheduler, **unsupported) -> None:
    """Raise for config values this module does not implement, instead of silently ignoring them."""
    for key, allowed in unsupported.items():
        value = scheduler.config.get(key, allowed[0])
        if value not in allowed:
            raise UsageError(
                f"{type(scheduler).__name__} with {key}={value!r} is not supported (supported: {list(allowed)})"
            )


class _DiscreteVP(Solver):
    """Shared part of DDIM, DDPM and LCM: discrete timesteps on a variance-preserving schedule,
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, and the (optionally clipped) x0/eps prediction of step i."""

    def __init__(self, scheduler, **unsupported):
        _reject(scheduler, thresholding=(False,), **unsupported)
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

    def _not_invertible_reason(self) -> str:
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
        x0, eps = _predict(self.prediction_type, model_out, x, *self._alpha_sigma[i])
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


class DPMSolverPP(Solver):
    """DPM-Solver++ (Lu et al., 2022), multistep, 1st or 2nd order (Algorithm 2), with diffusers' final-step rules.

    The data prediction of the previous step is carried in ``state.history``; a run's first step, or a step
    whose predecessor did not run, is first order, as in a scheduler loop started there.
    """

    def __init__(self, scheduler):
        cfg = scheduler.config
        _reject(
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

    def _not_invertible_reason(self) -> str:
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
        return _predict(self.prediction_type, model_out, x, alpha, sigma)[0]

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


_SOLVERS = {
    "DDIMScheduler": DDIMSolver,
    "DDPMScheduler": DDPMSolver,
    "DPMSolverMultistepScheduler": DPMSolverPP,
    "EulerDiscreteScheduler": EulerSolver,
    "FlowMatchEulerDiscreteScheduler": FlowEulerSolver,
    "LCMScheduler": LCMSolver,
}
SUPPORTED_SCHEDULERS = tuple(_SOLVERS)


def solver_from_scheduler(scheduler, num_inference_steps: int | None = None, *, eta: float = 0.0) -> Solver:
    """Build the pure solver equivalent to ``scheduler``'s loop over ``num_inference_steps`` steps.

    The scheduler is copied before ``set_timesteps``, so the caller's object is never changed. With
    ``num_inference_steps=None`` the scheduler's current timesteps are used as they are (for schedules that
    need extra ``set_timesteps`` arguments, such as ``mu`` for dynamic shifting). ``eta`` is DDIM's.
    """
    name = type(scheduler).__name__
    if name not in _SOLVERS:
        raise UsageError(f"scheduler {name} is not supported; supported schedulers: {', '.join(SUPPORTED_SCHEDULERS)}")
    if num_inference_steps is not None:
        num_inference_steps = check_int("num_inference_steps", num_inference_steps, minimum=1,
                                        maximum=scheduler.config.num_train_timesteps)
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(num_inference_steps)
    elif getattr(scheduler, "num_inference_steps", None) is None:
        raise UsageError(f"{name}.set_timesteps() has not been called; pass num_inference_steps")
    if name == "DDIMScheduler":
        solver = DDIMSolver(scheduler, eta=eta)
    elif check_number("eta", eta) != 0.0:
        raise UsageError(f"eta applies to DDIMScheduler only, not {name}", "eta")
    else:
        solver = _SOLVERS[name](scheduler)
    solver.init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
    solver.num_train_timesteps = int(scheduler.config.num_train_timesteps)  # the range of timesteps t
    return solver
