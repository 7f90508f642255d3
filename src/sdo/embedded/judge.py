"""The digit judge: a reader of generated digits that was not the reward (k nearest real digits, with a reject
option), for checking fine-tuning results against reward hacking."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import UsageError
from .digits import load_dataset

__all__ = ["DigitJudge"]


class DigitJudge:
    """A judge that was not the reward: k nearest neighbours (Euclidean, on the 8x8 average-pooled image, the
    digits' native resolution) among the real training digits, with a reject option.

    ``judge(images) -> labels``, -1 for an image farther from its k neighbours (mean distance) than
    ``reject_quantile`` of the held-out real digits are: grey textures and smudges are "not a digit" however
    confidently the reward's CNN classifier names them.
    """

    def __init__(self, k: int = 5, reject_quantile: float = 0.99, device="cpu"):
        if not 0 < reject_quantile <= 1:
            raise UsageError(f"reject_quantile must be in (0, 1], got {reject_quantile}")
        images, self.labels = load_dataset("train")
        self.bank, self.k = self._features(images).to(device), int(k)
        self.labels = self.labels.to(device)
        held, held_labels = load_dataset("test")
        labels, distance = self._neighbours(held.to(device))
        self.threshold = float(torch.quantile(distance, reject_quantile))
        self.accuracy = float((labels == held_labels.to(device)).float().mean())  # on the held-out real digits

    @staticmethod
    def _features(images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images.float().clamp(-1, 1), 2).flatten(1)

    def _neighbours(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = torch.cdist(self._features(images).to(self.bank.device), self.bank)
        near, index = dist.topk(self.k, largest=False)
        weight = 1 + 1e-3 / (1 + near)  # one vote each; ties go to the nearer neighbours
        votes = (F.one_hot(self.labels[index], 10).float() * weight[..., None]).sum(1)
        return votes.argmax(1), near.mean(1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        labels, distance = self._neighbours(images)
        return torch.where(distance > self.threshold, torch.full_like(labels, -1), labels)

    def read(self, images: torch.Tensor, target: int) -> dict:
        """How the judge reads ``images`` against ``target``: fractions judged the target, another digit, no digit."""
        labels = self(images)
        n = max(len(labels), 1)
        return {"judge_target": float((labels == target).sum()) / n,
                "judge_other": float(((labels != target) & (labels >= 0)).sum()) / n,
                "judge_rejected": float((labels < 0).sum()) / n}
