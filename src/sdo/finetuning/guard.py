"""A watch on reward hacking during fine-tuning: fixed-seed samples of the tuned model, read by signals that are
not the reward, against the same seeds' samples of the base model.

Reward hacking is the default outcome of reward fine-tuning: the reward climbs while the samples turn into
textures the reward model likes (on the digits, pixel noise the classifier reads as the target). The signals:

- **rejected**: the share of samples the task's judge rejects (``describe(images)["judge_rejected"]``; the digits
  task's k-NN judge on the real digits), above the base model's own share;
- **diversity**: the mean pairwise RMS distance between the samples, divided by the base model's (a collapse to
  one template, or noise, which is far more "diverse" than any model's samples);
- **drift**: the mean RMS distance of each sample from the base model's sample of the same seed, divided by the
  base model's diversity (1: as far as two unrelated base samples are from each other).

A check fails when any signal leaves its range (:class:`GuardLimits`); :func:`sdo.finetune` warns loudly, keeps
the LoRA of the last check that passed, and with ``stop_on_hacking`` stops after ``guard_patience`` failed checks in a
row (2: one failed check is often a transient, e.g. ShortFT's first stage, or the judge's sampling noise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..checks import UsageError

__all__ = ["Guard", "GuardCheck", "GuardLimits", "diversity", "drift"]


def diversity(images: torch.Tensor) -> float:
    """The mean RMS distance between two different images of the batch (0 for fewer than two)."""
    flat = images.detach().flatten(1).float().cpu()
    pairs = len(flat) * (len(flat) - 1)
    return float(torch.cdist(flat, flat).sum() / pairs / flat.shape[1] ** 0.5) if pairs else 0.0


def drift(images: torch.Tensor, base: torch.Tensor) -> float:
    """The mean RMS distance of each image from the base image of the same seed."""
    diff = (images.detach().float().cpu() - base.detach().float().cpu()).flatten(1)
    return float(diff.pow(2).mean(1).sqrt().mean())


@dataclass(frozen=True)
class GuardLimits:
    rejected: float = 0.2  # the judge may reject at most this share of samples more than it rejects of the base's
    diversity: tuple[float, float] = (0.2, 1.5)  # the tuned samples' diversity over the base's: within this range
    drift: float = 1.5  # the distance from the same seed's base sample, over the base's diversity: at most this


@dataclass(frozen=True)
class GuardCheck:
    update: int
    rejected: float | None  # the judge's rejection share (None: the task has no judge)
    diversity: float  # relative to the base model's
    drift: float  # relative to the base model's diversity
    failed: tuple[str, ...]  # the signals out of range, with their values; empty when the check passed

    @property
    def passed(self) -> bool:
        return not self.failed

    def record(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


class Guard:
    """Checks the tuned model's fixed-seed ``images`` against the base model's (``base``: the same seeds' images,
    ``describe``: the task's judge, ``(images, conditions) -> dict``, or None)."""

    def __init__(self, base: torch.Tensor, conditions: list, describe: Callable | None = None,
                 limits: GuardLimits = GuardLimits()):
        self.base, self.conditions, self.describe, self.limits = base.detach(), conditions, describe, limits
        self.base_diversity = diversity(base)
        if not self.base_diversity > 0:
            raise UsageError("the guard needs at least two different base samples (guard_count >= 2)")
        self.base_rejected = self._rejected(base)

    def _rejected(self, images: torch.Tensor) -> float | None:
        said = self.describe(images, self.conditions) if self.describe else {}
        return float(said["judge_rejected"]) if "judge_rejected" in said else None

    def check(self, update: int, images: torch.Tensor) -> GuardCheck:
        lim = self.limits
        rejected = self._rejected(images)
        spread = diversity(images) / self.base_diversity
        far = drift(images, self.base) / self.base_diversity
        failed = []
        if rejected is not None and rejected > self.base_rejected + lim.rejected:
            failed.append(f"the judge rejects {rejected:.0%} of the samples (the base model's: "
                          f"{self.base_rejected:.0%})")
        if not lim.diversity[0] <= spread <= lim.diversity[1]:
            failed.append(f"diversity {spread:.2f}x the base model's (allowed "
                          f"{lim.diversity[0]:g}-{lim.diversity[1]:g}x)")
        if far > lim.drift:
            failed.append(f"samples moved {far:.2f}x the base model's diversity from their seeds' base samples "
                          f"(allowed {lim.drift:g}x)")
        return GuardCheck(update, rejected, spread, far, tuple(failed))
