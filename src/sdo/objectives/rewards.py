"""Rewards for fine-tuning: ``reward(images, conditions) -> one reward per image`` (higher is better),
differentiable in ``images`` (Sec. 5.2 of Dou et al., 2025: the model is tuned so that its samples score higher).

Any objective of :mod:`sdo.objectives` or :mod:`sdo.objectives.clip` (a loss, lower is better) becomes a reward with
:func:`from_objective`. For the embedded digits: :class:`ClassLogProb` (the classifier's log-probability of a
target class), :class:`InkReward` (thicker strokes), and :class:`DigitJudge`, a second classifier of a
different kind (nearest neighbours on the real digits) that reads fine-tuned samples without having been
their reward, so that reward hacking shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..checks import UsageError

__all__ = ["ClassLogProb", "InkReward", "WeightedReward", "digits_reward", "from_objective"]


def _check(reward: torch.Tensor, images: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(reward) or tuple(reward.shape) != (images.shape[0],):
        shape = tuple(reward.shape) if torch.is_tensor(reward) else type(reward).__name__
        raise UsageError(f"{name} returned {shape}: a reward must be one value per image, shape ({images.shape[0]},)")
    return reward


class ClassLogProb:
    """``log p(target | image)`` under ``classifier`` (images clamped to [-1, 1] first, as decoded images are).
    ``target``: one class for every image; ``None``: each image's own condition (a class-conditional model
    rewarded for drawing what it was asked)."""

    def __init__(self, classifier: torch.nn.Module, target: int | None = None):
        self.classifier, self.target = classifier, target

    def __call__(self, images: torch.Tensor, conditions: Sequence) -> torch.Tensor:
        logp = self.classifier(images.clamp(-1, 1).to(next(self.classifier.parameters()).dtype)).float().log_softmax(-1)
        if self.target is not None:
            target = torch.full((images.shape[0],), int(self.target), device=logp.device)
        else:
            target = torch.as_tensor([int(c) for c in conditions], device=logp.device)
        return logp.gather(1, target[:, None]).squeeze(1)


class InkReward:
    """The ink mass of each image, ``sum((x + 1) / 2)`` clipped to [0, 1] per pixel, divided by ``scale`` (the
    mean ink of the real digits is about 78 on 16x16): a thickness reward."""

    def __init__(self, scale: float = 78.0):
        if not scale > 0:
            raise UsageError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def __call__(self, images: torch.Tensor, conditions: Sequence) -> torch.Tensor:
        return ((images.float() + 1) / 2).clamp(0, 1).flatten(1).sum(1) / self.scale


class WeightedReward:
    """``sum_k w_k r_k(images, conditions)``."""

    def __init__(self, terms: Sequence[tuple[Callable, float]]):
        if not terms:
            raise UsageError("WeightedReward needs at least one (reward, weight) pair")
        self.terms = [(r, float(w)) for r, w in terms]

    def __call__(self, images: torch.Tensor, conditions: Sequence) -> torch.Tensor:
        return sum(w * _check(r(images, conditions), images, type(r).__name__) for r, w in self.terms)


def from_objective(objective: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """The reward ``-objective(images)`` of a per-image loss (CLIP similarity, aesthetic score, ...)."""

    def reward(images: torch.Tensor, conditions: Sequence) -> torch.Tensor:
        return -_check(objective(images), images, "the objective")

    return reward


def digits_reward(name: str, classifier: torch.nn.Module, target: int | None = None, ink_weight: float = 0.1):
    """A digits reward by name: ``"class"`` (:class:`ClassLogProb`), ``"ink"`` (:class:`InkReward`) or
    ``"class+ink"`` (their sum, the ink term weighted by ``ink_weight``)."""
    if name == "class":
        return ClassLogProb(classifier, target)
    if name == "ink":
        return InkReward()
    if name == "class+ink":
        return WeightedReward([(ClassLogProb(classifier, target), 1.0), (InkReward(), ink_weight)])
    raise UsageError(f"unknown digits reward {name!r}; use 'class', 'ink' or 'class+ink'")
