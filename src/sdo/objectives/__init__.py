"""Objectives ``objective(x0) -> loss`` and rewards ``reward(images, conditions) -> scores``: leaves that import
nothing of sdo above :mod:`sdo.checks`. Image-space objectives in :mod:`~sdo.objectives.image` (re-exported here),
CLIP's in :mod:`~sdo.objectives.clip`, fine-tuning rewards in :mod:`~sdo.objectives.rewards`. A new objective or
reward goes into one of them, or a new file here."""

from .image import (
    Clamped,
    ClassifierCrossEntropy,
    ClassifierMargin,
    FeatureMatch,
    Fidelity,
    GramStyle,
    WeightedSum,
    gram_matrix,
)

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
