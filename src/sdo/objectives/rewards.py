"""Rewards for fine-tuning: ``reward(images, conditions) -> one reward per image`` (higher is better),
differentiable in ``images`` (Sec. 5.2 of Dou et al., 2025: the model is tuned so that its samples score higher).

Any objective of :mod:`sdo.objectives` or :mod:`sdo.objectives.clip` (a loss, lower is better) becomes a reward with
:func:`from_objective`. For the embedded digits: :class:`ClassLogProb` (the classifier's log-probability of a
target class), :class:`InkReward` (thicker strokes), and :class:`DigitJudge`, a second classifier of a
different kind (nearest neighbours on the real digits) that reads fine-tuned samples without having been
their reward, so that reward hacking shows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..checks import UsageError

__all__ = [
    "ClassLogProb",
    "InkReward",
    "WeightedReward",
    "digits_reward",
    "digits_reward_terms",
    "from_objective",
    "parse_rewards",
]


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


def digits_reward(spec: str, classifier: torch.nn.Module, target: int | None = None, ink_weight: float = 0.1):
    """A digits reward by ``NAME[:weight],...`` (:func:`parse_rewards`): ``"class"`` (:class:`ClassLogProb`),
    ``"ink"`` (:class:`InkReward`), or a weighted sum such as ``"class:1,ink:0.1"``; ``"class+ink"`` is the older
    spelling of ``"class:1,ink:ink_weight"``."""
    terms = digits_reward_terms(spec, ink_weight)
    parts = {"class": lambda: ClassLogProb(classifier, target), "ink": InkReward}
    if len(terms) == 1 and terms[0][1] == 1.0:
        return parts[terms[0][0]]()
    return WeightedReward([(parts[name](), weight) for name, weight in terms])


def digits_reward_terms(spec: str, ink_weight: float = 0.1) -> list[tuple[str, float]]:
    """The ``(name, weight)`` terms of a digits ``--reward``, checked (what :func:`digits_reward` builds)."""
    return parse_rewards(f"class:1,ink:{ink_weight}" if spec == "class+ink" else spec, ("class", "ink"))


def parse_rewards(spec: str, names: Sequence[str]) -> list[tuple[str, float]]:
    """``"pickscore:1,clip:0.5"`` -> ``[("pickscore", 1.0), ("clip", 0.5)]`` (the command line's ``--reward``), each
    name one of ``names``; a name without a weight weighs 1.
    A :class:`~sdo.UsageError` for an unknown or repeated name, or a weight that is not a finite number."""
    terms = []
    for part in str(spec).split(","):
        name, _, weight = part.strip().partition(":")
        if name not in names:
            raise UsageError(f"unknown reward {name!r} in {spec!r}; use NAME[:weight],... with NAME one of "
                             f"{', '.join(names)}", "reward")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = float("nan")
        if not math.isfinite(value):
            raise UsageError(f"reward weight {weight!r} of {name!r} is not a finite number", "reward")
        if name in (n for n, _ in terms):
            raise UsageError(f"reward {name!r} appears twice in {spec!r}", "reward")
        terms.append((name, value))
    return terms
