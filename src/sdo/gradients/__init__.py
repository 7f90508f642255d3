"""Gradient methods: which denoiser calls keep a graph, and how backward runs (``strategy.run(chain, x, state,
steps)``). A new method is one file here: a :class:`~sdo.gradients.base.Strategy` subclass registered under its
name with ``@register_strategy``, imported below so that the name table knows it."""

from .adjoint import Adjoint
from .base import (
    Checkpoint,
    ConstantMemory,
    Full,
    RandomTruncated,
    Shortcut,
    Strategy,
    Truncated,
    available_strategies,
    get_strategy,
    register_strategy,
    strategy_classes,
    strategy_for,
)
from .reversible import Reversible, edict_step

__all__ = [
    "Adjoint",
    "Checkpoint",
    "ConstantMemory",
    "Full",
    "RandomTruncated",
    "Reversible",
    "Shortcut",
    "Strategy",
    "Truncated",
    "available_strategies",
    "edict_step",
    "get_strategy",
    "register_strategy",
    "strategy_classes",
    "strategy_for",
]
