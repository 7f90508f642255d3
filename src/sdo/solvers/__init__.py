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
