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
from collections.abc import Sequence

from ..checks import UsageError, check_int, check_number
from .base import Solver, SolverState
from .dpm import DPMSolverPP
from .euler import EulerSolver, FlowEulerSolver
from .vp import DDIMSolver, DDPMSolver, LCMSolver

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

# a diffusers scheduler class -> its pure solver; a new scheduler is one solver class (a file here) and one entry
_SOLVERS = {
    "DDIMScheduler": DDIMSolver,
    "DDPMScheduler": DDPMSolver,
    "DPMSolverMultistepScheduler": DPMSolverPP,
    "EulerDiscreteScheduler": EulerSolver,
    "FlowMatchEulerDiscreteScheduler": FlowEulerSolver,
    "LCMScheduler": LCMSolver,
}
SUPPORTED_SCHEDULERS = tuple(_SOLVERS)


def solver_from_scheduler(scheduler, num_inference_steps: int | None = None, *, eta: float = 0.0,
                          mu: float | None = None, sigmas: Sequence[float] | None = None) -> Solver:
    """Build the pure solver equivalent to ``scheduler``'s loop over ``num_inference_steps`` steps.

    The scheduler is copied before ``set_timesteps``, so the caller's object is never changed. With
    ``num_inference_steps=None`` the scheduler's current timesteps are used as they are. ``eta`` is DDIM's.
    ``mu`` and ``sigmas`` go to a flow-matching scheduler's ``set_timesteps`` as FLUX's and SD3's pipelines pass
    them: ``mu``, the resolution-dependent shift of a scheduler with ``use_dynamic_shifting`` (required there);
    ``sigmas``, one per step (FLUX: ``linspace(1, 1/N, N)``).
    """
    name = type(scheduler).__name__
    if name not in _SOLVERS:
        raise UsageError(f"scheduler {name} is not supported; supported schedulers: {', '.join(SUPPORTED_SCHEDULERS)}")
    extra = {k: v for k, v in (("mu", mu), ("sigmas", sigmas)) if v is not None}
    if extra and name != "FlowMatchEulerDiscreteScheduler":
        raise UsageError(f"mu and sigmas apply to FlowMatchEulerDiscreteScheduler only, not {name}")
    if mu is not None:
        extra["mu"] = check_number("mu", mu)
    if sigmas is not None:
        extra["sigmas"] = [check_number("sigmas", v, minimum=0.0, maximum=1.0) for v in sigmas]
        if num_inference_steps is not None and len(extra["sigmas"]) != num_inference_steps:
            raise UsageError(f"{len(extra['sigmas'])} sigmas for {num_inference_steps} steps; give one per step")
    dynamic = bool(scheduler.config.get("use_dynamic_shifting", False))
    if num_inference_steps is not None or extra:
        if dynamic and mu is None:
            raise UsageError(f"{name} shifts its schedule by the image size (use_dynamic_shifting): pass mu, as the "
                             "pipeline computes it (sdo.backbones.flow_schedule)", "mu")
        if num_inference_steps is not None:
            num_inference_steps = check_int("num_inference_steps", num_inference_steps, minimum=1,
                                            maximum=scheduler.config.num_train_timesteps)
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(num_inference_steps, **extra)
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
