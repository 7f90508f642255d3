"""Picard iteration of the sampling chain: ParaDiGMS (Shih et al., "Parallel Sampling of Diffusion Models",
NeurIPS 2023, Algorithm 1), the fixed-point view SDO's derivation rests on (Prop. 4.1 of Dou et al., 2025).

The trajectory x_0..x_N of a chain is the fixed point of x_{i+1} = x_b + sum_{s=b}^{i} d_s(x_s), with the
one-step drifts d_s(x) = step(s, x) - x. A sweep evaluates the denoiser at every step of a window [b, b + p) in
one batched call, then updates the window's latents by the cumulative sum of the drifts. The window slides to
the first step whose latent still moved by more than the tolerance, measured as in ParaDiGMS against the noise
level: mean((x_new - x_old)^2) <= tol^2 sigma_{i+1}^2 for every item. Step b's output is exact after any sweep,
so the window advances at least one step per sweep and ``max_sweeps >= N`` with ``tol = 0`` reproduces sequential
sampling (up to the round-off of the sums). Stochastic solvers draw all their noise before the first sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chain import Chain
from .denoiser import Denoiser, _map
from .solvers import DPMSolverPP

__all__ = ["PicardResult", "picard_sample"]


@dataclass
class PicardResult:
    sample: torch.Tensor  # x_N
    trajectory: list[torch.Tensor]  # x_0 (the start) .. x_N: the latent before every step, and the sample
    sweeps: int  # batched denoiser evaluations (one per sweep)
    calls: int  # denoiser evaluations of one latent batch at one step, summed over sweeps
    converged: bool  # the window reached the end within max_sweeps


def _tiled(denoiser: Denoiser, n: int) -> Denoiser:
    """The same denoiser over ``n`` latent batches stacked along the batch dimension."""
    def tile(v):
        return v if v.ndim == 0 or v.shape[0] == 1 else v.repeat(n, *[1] * (v.ndim - 1))

    return Denoiser(denoiser.model, _map(tile, denoiser.cond), _map(tile, denoiser.uncond) if denoiser.uncond else None,
                    denoiser.guidance_scale)


def picard_sample(chain: Chain, x: torch.Tensor, *, window: int | None = None, tol: float = 1e-3,
                  max_sweeps: int | None = None, init: list[torch.Tensor] | None = None,
                  generator: torch.Generator | None = None) -> PicardResult:
    """Sample ``chain`` from ``x`` by sliding-window Picard sweeps (module docstring).

    ``window``: steps evaluated per sweep (default: all N). ``tol``: ParaDiGMS's tolerance, relative to the noise
    level of each step's output. ``max_sweeps``: default N, enough for the exact sequential result. ``init``: a
    trajectory of N + 1 latents to start from (a previous run's: a warm start); default: every latent is ``x``.
    For first-order solvers (DDIM, DDPM, Euler, flow Euler, LCM); multistep ones carry history between steps
    and are refused. No gradient is taken here; this is a forward pass."""
    solver, n = chain.solver, len(chain)
    if isinstance(solver, DPMSolverPP):
        raise ValueError("Picard sweeps need one-step updates; DPMSolverMultistepScheduler carries history between "
                         "steps: use DDIM, Euler or flow Euler")
    window = n if window is None else int(window)
    max_sweeps = n if max_sweeps is None else int(max_sweeps)
    if window < 1 or max_sweeps < 1 or tol < 0:
        raise ValueError(f"need window >= 1, max_sweeps >= 1, tol >= 0; got {window}, {max_sweeps}, {tol}")
    if init is not None and len(init) != n + 1:
        raise ValueError(f"init must hold the {n + 1} latents of a trajectory (x_0..x_N), got {len(init)}")
    chain.check(x)
    state = chain.init_state(x, generator)
    path = [x] + ([v.to(x) for v in init[1:]] if init is not None else [x] * n)
    levels = [solver.levels(i)[1][1] ** 2 for i in range(n)]
    floor = min((v for v in levels if v > 0), default=1.0)
    batch, begin, sweeps, calls = x.shape[0], 0, 0, 0
    with torch.no_grad():
        while begin < n and sweeps < max_sweeps:
            steps = range(begin, min(begin + window, n))
            inputs = torch.cat([solver.model_input(i, path[i]) for i in steps])
            t = torch.cat([solver.timesteps[i].reshape(1).expand(batch) for i in steps])
            outs = _tiled(chain.denoiser, len(steps))(inputs, t).split(batch)
            new, moved = path[begin], []
            for i, out in zip(steps, outs, strict=True):
                new = new + (solver.step(i, path[i], out, state)[0] - path[i])
                error = (new - path[i + 1]).double().pow(2).flatten(1).mean(1).max() / max(levels[i], floor)
                moved.append(float(error) > tol**2)
                path[i + 1] = new
            sweeps, calls = sweeps + 1, calls + len(steps)
            begin += max(1, moved.index(True) if True in moved else len(steps))
    return PicardResult(path[-1], path, sweeps, calls, begin >= n)
