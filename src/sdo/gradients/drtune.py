"""DRTune (Wu et al., 2024, "Deep Reward Supervision for Tuning Text-to-Image Diffusion Models"): the gradient is
stopped at every denoiser call's input, and only the calls of a few evenly spaced steps keep a graph. Structurally
it is SDO with K kept calls whose input Jacobians are dropped; with K = 1 its weight gradient is SDO's."""

from __future__ import annotations

import torch

from ..checks import check_int
from .base import Strategy, randint, register_strategy

__all__ = ["DRTune"]


@register_strategy("drtune")
class DRTune(Strategy):
    """Every denoiser call sees its input with the gradient stopped, out = model(stop_grad(x_i)), so the gradient
    reaches earlier states only along the solver updates' skip path; the calls of ``k`` steps spaced N // k apart,
    from an offset drawn uniformly in [0, N // k) on every run, keep their graph (all of them when k >= N).

    ``k``: the trained steps per trajectory (default 5; the method as the issue describes it, its paper's schedule
    options such as early stopping are not implemented). ``generator``: the offset's draw."""

    def __init__(self, k: int = 5, generator: torch.Generator | None = None):
        self.k, self.generator = check_int("k", k, minimum=1), generator

    @classmethod
    def for_latents(cls, *, steps, generator=None):
        return cls(generator=generator)

    @classmethod
    def for_weights(cls, *, steps, generator=None, k=1):
        return cls(generator=generator)

    def select(self, steps):
        if self.k >= len(steps):
            return set(steps)
        stride = len(steps) // self.k
        offset = randint(0, stride - 1, self.generator)
        return {steps.start + offset + j * stride for j in range(self.k)}

    def run(self, chain, x, state, steps):
        keep = self.select(steps)
        grad = torch.is_grad_enabled()
        for i in steps:
            with torch.set_grad_enabled(grad and i in keep):
                out = chain.denoise(i, x.detach())
            x, state = chain.update(i, x, out, state)
        return x
