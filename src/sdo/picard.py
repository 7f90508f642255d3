"""Picard iteration of the sampling chain: ParaDiGMS (Shih et al., "Parallel Sampling of Diffusion Models",
NeurIPS 2023, Algorithm 1), the fixed-point view SDO's derivation rests on (Prop. 4.1 of Dou et al., 2025).

The trajectory x_b..x_N of a chain is the fixed point of x_{i+1} = x_b + sum_{s=b}^{i} d_s(x_s), with the
one-step drifts d_s(x) = step(s, x) - x. A sweep evaluates the denoiser at every step of a window [b, b + p) in
one batched call, then updates the window's latents by the cumulative sum of the drifts. As in ParaDiGMS's
Algorithm 1 and its diffusers pipeline:

- a latent has converged when, for every item, the mean squared change between two sweeps is at most tol^2
  times the variance of the noise a stochastic (DDPM) step adds there (:func:`_noise_variance`); a latent
  whose step adds none (the last one of DDIM) must not change at all;
- the window slides past the first latent that has not: that one was computed from converged latents, so it
  is final too. It therefore advances at least one step per sweep, and with ``tol = 0`` and ``max_sweeps >= N``
  the result is the sequential sample (up to the round-off of the sums);
- latents entering the window for the first time start from the last computed one, unless a warm start
  (``init``) gives them.

Solvers: the first-order ones (DDIM, DDPM, Euler, flow Euler, LCM) map (x_i, model output) to x_{i+1} alone.
Stochastic ones draw the noise of every step before the first sweep (``chain.init_state``), so the fixed point
is one fixed sample path. The rule for multistep solvers (DPM-Solver++ 2M): their update also reads the data
prediction of step i - 1, which lives in the solver state; a sweep threads that state from step to step with
the outputs of the same sweep (the window's first step takes it from the step before, which is final), so the
fixed point of the pair (latent, history) is again the sequential run.

:class:`Picard` carries these options into :class:`~sdo.Shortcut` (``Shortcut(picard=Picard(...))``): the
forward pass of SDO runs by sweeps, then one denoiser call keeps its graph (see ``Shortcut.run``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .chain import Chain, step_range
from .checks import UsageError, check_int, check_number
from .denoiser import Denoiser, map_tensors
from .solvers import SolverState

__all__ = ["Picard", "PicardResult", "picard_sample"]


@dataclass
class PicardResult:
    sample: torch.Tensor  # the latent after the last step (x_N when the run ends the chain)
    trajectory: list[torch.Tensor]  # the latent before every step that ran (x_start first), then the sample
    outputs: list[torch.Tensor]  # each step's model output, from its last evaluation
    sweeps: int  # batched denoiser evaluations (one per sweep)
    calls: int  # denoiser evaluations of one latent batch at one step, summed over sweeps
    converged: bool  # the window reached the end within max_sweeps


def _tiled(denoiser: Denoiser, n: int) -> Denoiser:
    """The same denoiser over ``n`` latent batches stacked along the batch dimension."""
    def tile(v):
        return v if v.ndim == 0 or v.shape[0] == 1 else v.repeat(n, *[1] * (v.ndim - 1))

    return Denoiser(denoiser.model, map_tensors(tile, denoiser.cond),
                    map_tensors(tile, denoiser.uncond) if denoiser.uncond else None, denoiser.guidance_scale)


def _check_options(window, tol, max_sweeps) -> tuple:
    """``(window, tol, max_sweeps)`` checked: whole numbers >= 1 (or None) and a finite tolerance >= 0."""
    return (None if window is None else check_int("window", window, minimum=1), check_number("tol", tol, minimum=0),
            None if max_sweeps is None else check_int("max_sweeps", max_sweeps, minimum=1))


def _noise_variance(solver, i: int) -> float:
    """Variance of the noise a stochastic (DDPM, eta = 1) step i would add, in latent units:
    sigma_out^2 (1 - (alpha_in sigma_out / (alpha_out sigma_in))^2), the scale ParaDiGMS measures errors against."""
    (a_in, s_in), (a_out, s_out) = solver.levels(i)
    return max(s_out**2 * (1.0 - (a_in * s_out / (a_out * s_in)) ** 2), 0.0) if a_out > 0 and s_in > 0 else 0.0


def _sweeps(chain: Chain, x: torch.Tensor, state: SolverState, steps: range, window: int | None, tol: float,
            max_sweeps: int | None, init: list[torch.Tensor] | None) -> PicardResult:
    """Sliding-window Picard iteration over ``steps`` from ``x`` (module docstring); no graph."""
    solver, n, first = chain.solver, len(steps), steps.start
    window = n if window is None else int(window)
    max_sweeps = n if max_sweeps is None else int(max_sweeps)
    if init is not None:
        if len(init) != n + 1:
            raise UsageError(f"init must hold the {n + 1} latents of a trajectory over steps {first}..{steps.stop - 1} "
                             f"(the start, then the latent after each step), got {len(init)}")
        if any(v.shape != x.shape for v in init):
            raise UsageError(f"init's latents must have the shape of x, {tuple(x.shape)}")
    x = x.detach()
    path = [x] + ([v.detach().to(x) for v in init[1:]] if init is not None else [x] * n)
    reached = n if init is not None else 0  # latents beyond it were never computed (cold start)
    states, outputs = [state] + [None] * n, [None] * n
    variances = [_noise_variance(solver, i) for i in steps]
    batch, begin, sweeps, calls = x.shape[0], 0, 0, 0
    tiled = {}  # window length -> the denoiser over that many stacked batches (tiled once, not every sweep)
    with torch.no_grad():
        while begin < n and sweeps < max_sweeps:
            span = range(begin, min(begin + window, n))
            for k in range(reached + 1, span.stop + 1):  # new latents start from the last computed one (ParaDiGMS)
                path[k] = path[reached]
            reached = max(reached, span.stop)
            inputs = torch.cat([solver.model_input(first + k, path[k]) for k in span])
            t = torch.cat([solver.timesteps[first + k].reshape(1).expand(batch) for k in span])
            if len(span) not in tiled:
                tiled[len(span)] = _tiled(chain.denoiser, len(span))
            outs = tiled[len(span)](inputs, t).split(batch)
            new, errors = path[begin], []
            for k, out in zip(span, outs, strict=True):
                x_next, states[k + 1] = solver.step(first + k, path[k], out, states[k])
                new = new + (x_next - path[k])
                errors.append((new - path[k + 1]).double().pow(2).flatten(1).mean(1).max())
                path[k + 1], outputs[k] = new, out
            limits = [tol**2 * variances[k] for k in span]  # 0 where the step adds no noise: any change counts
            moved = [e > limit for e, limit in zip(torch.stack(errors).tolist(), limits, strict=True)]  # one sync
            sweeps, calls = sweeps + 1, calls + len(span)
            # latents up to the first that moved had converged inputs, so that one is exact too (ParaDiGMS)
            begin += min(moved.index(True) + 1 if True in moved else len(span), len(span))
    return PicardResult(path[-1], path, outputs, sweeps, calls, begin >= n)


def picard_sample(chain: Chain, x: torch.Tensor, *, window: int | None = None, tol: float = 1e-3,
                  max_sweeps: int | None = None, init: list[torch.Tensor] | None = None, start: int = 0,
                  stop: int | None = None, generator: torch.Generator | None = None) -> PicardResult:
    """Run steps ``start..stop-1`` of ``chain`` from ``x`` by sliding-window Picard sweeps (module docstring).

    ``window``: steps evaluated per sweep, in one batched denoiser call (default: all). ``tol``: ParaDiGMS's
    tolerance, relative to the noise a DDPM step adds at each latent (0: iterate to the exact sequential result).
    ``max_sweeps``: default the number of steps, enough for that. ``init``: a trajectory to start from (a
    previous run's ``trajectory``: a warm start); default: a cold start, each latent from the last computed.
    ``generator`` draws the noise of stochastic solvers, all of it before the first sweep, as :func:`sdo.sample` does.
    No gradient is taken here: this is a forward pass (for SDO's gradient on top of it,
    ``Shortcut(picard=Picard(...))``)."""
    window, tol, max_sweeps = _check_options(window, tol, max_sweeps)
    steps = step_range(chain, start, stop)
    chain.check(x)
    return _sweeps(chain, x, chain.init_state(x, generator), steps, window, tol, max_sweeps, init)


@dataclass(frozen=True, eq=False)
class Picard:
    """Options of a Picard forward pass for :class:`~sdo.Shortcut` (``Shortcut(picard=Picard(window=10))``); they
    never change. ``window``, ``tol``, ``max_sweeps``: as in :func:`picard_sample`. ``init``: a trajectory every
    run starts from (None: a cold start). ``warm_start``: for :func:`~sdo.optimize_latent`, which then starts each
    iteration's run from the previous iteration's trajectory (its latent moved by one optimizer step), a warm start
    its loop carries, not this object."""

    window: int | None = None
    tol: float = 1e-3
    max_sweeps: int | None = None
    warm_start: bool = False
    init: list[torch.Tensor] | None = None

    def __post_init__(self):
        window, tol, max_sweeps = _check_options(self.window, self.tol, self.max_sweeps)
        for name, value in (("window", window), ("tol", tol), ("max_sweeps", max_sweeps),
                            ("warm_start", bool(self.warm_start))):
            object.__setattr__(self, name, value)

    def __call__(self, chain: Chain, x: torch.Tensor, state: SolverState, steps: range,
                 init: list[torch.Tensor] | None = None) -> PicardResult:
        """The sweeps over ``steps`` from ``x``, started from ``init`` (default: the options' ``init``)."""
        result = _sweeps(chain, x, state, steps, self.window, self.tol, self.max_sweeps,
                         self.init if init is None else init)
        if not result.converged:
            warnings.warn(f"Picard sweeps stopped at max_sweeps={result.sweeps} before converging to tol={self.tol}: "
                          "the sample is not the sequential one; raise max_sweeps", RuntimeWarning, stacklevel=3)
        return result

    def __repr__(self) -> str:
        return (f"Picard(window={self.window}, tol={self.tol}, max_sweeps={self.max_sweeps}, "
                f"warm_start={self.warm_start})")
