"""Objectives: plain callables ``objective(x0) -> per-item loss`` (shape ``(batch,)``).

None of them clamps, detaches or disables gradients: what the sample is, the objective sees, and the
gradient flows wherever the objective depends on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..checks import UsageError

__all__ = [
    "Clamped",
    "ClassifierCrossEntropy",
    "ClassifierMargin",
    "FeatureMatch",
    "Fidelity",
    "GramStyle",
    "WeightedSum",
    "gram_matrix",
]


class Clamped:
    """``objective(x0.clamp(-1, 1))``: the objective of the sample as it is saved and shown, as the paper's loop
    clamps the output before the loss (zero gradient where a pixel is outside [-1, 1])."""

    def __init__(self, objective: Callable[[torch.Tensor], torch.Tensor]):
        self.objective = objective

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return self.objective(x0.clamp(-1, 1))


class ClassifierMargin:
    """Carlini-Wagner margin for adversarial generation (Sec. 5.1.4 of Dou et al., 2025):
    ``max(0, z_y - max_{j != y} z_j + margin)`` per item; zero once the classifier prefers another class by
    ``margin`` logits."""

    def __init__(self, classifier: nn.Module, labels: torch.Tensor, margin: float = 1.0):
        if margin < 0:
            raise UsageError(f"margin must be >= 0, got {margin}")
        self.classifier, self.labels, self.margin = classifier, labels, float(margin)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x0)
        true = logits.gather(1, self.labels[:, None]).squeeze(1)
        others = logits.scatter(1, self.labels[:, None], float("-inf")).amax(dim=1)
        return torch.relu(true - others + self.margin)


class ClassifierCrossEntropy:
    """Cross-entropy of ``classifier(x0)`` against ``labels`` per item (targeted adversarial generation: the
    labels are the classes to reach)."""

    def __init__(self, classifier: nn.Module, labels: torch.Tensor):
        self.classifier, self.labels = classifier, labels

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.classifier(x0), self.labels.to(x0.device), reduction="none")


class Fidelity:
    """Distance to a reference image per item (Eq. 23's fidelity term): the mean of ``|x0 - reference|^p``,
    ``p`` = 1 (L1) or 2 (squared L2); ``reference`` of batch 1 or the batch's size."""

    def __init__(self, reference: torch.Tensor, p: int = 1):
        if p not in (1, 2):
            raise UsageError(f"p must be 1 or 2, got {p}")
        self.reference, self.p = reference.detach(), p

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self.reference.shape[1:] != x0.shape[1:] or self.reference.shape[0] not in (1, x0.shape[0]):
            raise UsageError(f"reference of shape {tuple(self.reference.shape)} does not match x0 {tuple(x0.shape)}")
        diff = (x0 - self.reference.to(x0)).abs()
        return (diff if self.p == 1 else diff**2).flatten(1).mean(dim=1)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Per-item Gram matrix of (batch, channels, ...) features, normalized by the number of entries."""
    f = features.flatten(2)
    return f @ f.transpose(1, 2) / f.shape[1] / f.shape[2]


class GramStyle:
    """Style loss (Gatys et al., 2016; Eq. 24 of Dou et al., 2025): the squared Frobenius distance between the
    Gram matrices of ``features(x0)`` and of ``features(reference)``, summed over ``layers``."""

    def __init__(
        self,
        features: Callable[[torch.Tensor], Sequence[torch.Tensor]],
        reference: torch.Tensor,
        layers: Sequence[int] | None = None,
    ):
        if reference.ndim < 3:
            raise UsageError(f"reference must be a batch of images (1, C, H, W), got shape {tuple(reference.shape)}")
        self.features = features
        with torch.no_grad():
            feats = list(features(reference[:1] if reference.ndim == 4 else reference[None]))
        self.layers = list(range(len(feats))) if layers is None else list(layers)
        if not self.layers or any(not 0 <= i < len(feats) for i in self.layers):
            raise UsageError(f"layers must index the {len(feats)} feature maps, got {self.layers}")
        self.targets = [gram_matrix(feats[i]) for i in self.layers]

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        feats = self.features(x0)
        return sum(((gram_matrix(feats[i]) - g) ** 2).sum(dim=(1, 2))
                   for i, g in zip(self.layers, self.targets, strict=True))


class FeatureMatch:
    """Content loss (Gatys et al., 2016): mean squared distance between ``features(x0)`` and the features of
    per-item ``reference`` images at ``layers`` (keeps what the sample shows while its style changes)."""

    def __init__(self, features: Callable[[torch.Tensor], Sequence[torch.Tensor]], reference: torch.Tensor,
                 layers: Sequence[int]):
        self.features, self.layers = features, list(layers)
        with torch.no_grad():
            feats = list(features(reference))
        if not self.layers or any(not 0 <= i < len(feats) for i in self.layers):
            raise UsageError(f"layers must index the {len(feats)} feature maps, got {self.layers}")
        self.targets = [feats[i] for i in self.layers]

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        feats = self.features(x0)
        return sum(((feats[i] - t) ** 2).flatten(1).mean(dim=1) for i, t in zip(self.layers, self.targets, strict=True))


class WeightedSum:
    """``sum_k w_k * objective_k(x0)`` (Eq. 23's lambda-weighted combination of Dou et al., 2025)."""

    def __init__(self, terms: Sequence[tuple[float, Callable[[torch.Tensor], torch.Tensor]]]):
        if not terms:
            raise UsageError("WeightedSum needs at least one (weight, objective) term")
        self.terms = [(float(w), f) for w, f in terms]

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return sum(w * f(x0) for w, f in self.terms)
