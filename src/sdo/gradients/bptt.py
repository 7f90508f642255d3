"""Backpropagation through the chain and its truncations: :class:`Full` (BPTT), :class:`Checkpoint` (Chen et al.,
2016), :class:`Truncated` (DRaFT-K, Clark et al., 2024; AlignProp-1) and :class:`RandomTruncated` (AlignProp,
Prabhudesai et al., 2023): which denoiser calls keep their graph (:meth:`Strategy.select`)."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..checks import UsageError
from .base import Strategy, randint, register_strategy

__all__ = ["Checkpoint", "Full", "RandomTruncated", "Truncated"]


@register_strategy("full")
class Full(Strategy):
    """Backpropagation through every step (BPTT): exact, memory grows with the number of steps."""

    def select(self, steps):
        return steps


@register_strategy("checkpoint")
class Checkpoint(Strategy):
    """The exact gradient of :class:`Full`; each step is recomputed in backward, so only states are kept."""

    def select(self, steps):
        return steps

    def run(self, chain, x, state, steps):
        if not torch.is_grad_enabled():
            return super().run(chain, x, state, steps)
        for i in steps:
            x, state = checkpoint(chain.step, i, x, state, use_reentrant=False)
        return x


@register_strategy("truncated")
class Truncated(Strategy):
    """Only the last ``k`` denoiser calls keep a graph (DRaFT-K; ``k=1`` is AlignProp-1 / DRaFT-1).
    ``checkpoint=True`` recomputes those calls in backward (the same gradient, less memory)."""

    def __init__(self, k: int = 1, checkpoint: bool = False):
        if int(k) < 1:
            raise UsageError(f"k must be >= 1, got {k}")
        self.k, self.checkpoint = int(k), bool(checkpoint)

    @classmethod
    def for_weights(cls, *, steps, generator=None, k=1):
        return cls(k)

    def select(self, steps):
        return range(max(steps.start, steps.stop - self.k), steps.stop)


@register_strategy("random-truncated")
class RandomTruncated(Strategy):
    """The last k denoiser calls keep a graph, k ~ Uniform{low, ..., high} drawn once per trajectory
    (AlignProp's randomized truncation; k is capped at the number of steps that run). ``checkpoint=True``
    recomputes the kept calls in backward, as AlignProp's authors run it."""

    def __init__(self, low: int = 1, high: int = 50, generator: torch.Generator | None = None,
                 checkpoint: bool = False):
        if not 1 <= int(low) <= int(high):
            raise UsageError(f"need 1 <= low <= high, got low={low}, high={high}")
        self.low, self.high, self.generator, self.checkpoint = int(low), int(high), generator, bool(checkpoint)

    @classmethod
    def for_latents(cls, *, steps, generator=None):
        return cls(1, steps, generator=generator)

    @classmethod
    def for_weights(cls, *, steps, generator=None, k=1):  # k ~ U{1..N}, the kept calls recomputed, as AlignProp
        return cls(1, steps, generator=generator, checkpoint=True)

    def select(self, steps):
        k = randint(self.low, self.high, self.generator)
        return range(max(steps.start, steps.stop - k), steps.stop)
