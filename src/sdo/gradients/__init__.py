"""Gradient methods: which denoiser calls keep a graph, and how backward runs (``strategy.run(chain, x, state,
steps)``). A new method is one file here: a :class:`~sdo.gradients.base.Strategy` subclass registered under its
name with ``@register_strategy``, imported below so that the name table knows it."""

# isort: off
# the order of registration is the name table's order (sdo bench's rows): BPTT and its truncations, SDO, then the
# methods with their own backward
from .base import (
    ConstantMemory,
    Strategy,
    available_strategies,
    check_latent_gradient,
    get_strategy,
    register_strategy,
    strategy_classes,
    strategy_for,
)
from .bptt import Checkpoint, Full, RandomTruncated, Truncated
from .shortcut import Shortcut
from .adjoint import Adjoint
from .reversible import Reversible, edict_step
from .drtune import DRTune
from .onestep import DirectAlign, DRaFTLV, ReFL
# isort: on

__all__ = [
    "Adjoint",
    "Checkpoint",
    "ConstantMemory",
    "DRTune",
    "DRaFTLV",
    "DirectAlign",
    "Full",
    "RandomTruncated",
    "ReFL",
    "Reversible",
    "Shortcut",
    "Strategy",
    "Truncated",
    "available_strategies",
    "check_latent_gradient",
    "edict_step",
    "get_strategy",
    "register_strategy",
    "strategy_classes",
    "strategy_for",
]
