"""Gradient strategies: which denoiser evaluations of a chain keep their autograd graph, and how.

Every strategy runs the same forward computation. Solver updates always keep their (cheap) graph, so the
gradient can flow along the skip path x_{i+1} <- x_i; strategies differ only in which *denoiser* calls
keep theirs:

===================  ===========================================  =========================================
name                 denoiser calls with a graph                  reference
===================  ===========================================  =========================================
``full``             all                                          backpropagation through time
``checkpoint``       all, recomputed step by step in backward     Chen et al., 2016
``truncated``        the last k                                   DRaFT-K (Clark et al., 2024); k=1 is
                                                                  AlignProp-1 / DRaFT-1
``random-truncated`` the last k, k ~ U{low..high} per trajectory  AlignProp (Prabhudesai et al., 2023)
``sdo``              one: the first step run, a random one, or a  SDO (Dou et al., 2025), Eqs. 18-20
                     given one
``adjoint``          none in forward; one step at a time in       AdjointDPM (Pan et al., 2024); see
                     backward, at states rebuilt (or stored)      :mod:`sdo.gradients.adjoint`
``reversible``       none in forward; one EDICT step at a time    DOODL (Wallace et al., 2023); see
                     in backward, at states rebuilt exactly       :mod:`sdo.gradients.reversible`
===================  ===========================================  =========================================

The last two subclass :class:`ConstantMemory`: a forward pass without a graph and a hand-written backward.

For the latent of the first step, ``Shortcut`` gives Eq. 19: dJ/dx0 * (prod of the later solver updates'
Jacobians with model outputs held fixed) * dx_{i+1}/dx_i; for parameters at step i', Eq. 20.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch.utils.checkpoint import checkpoint

from ..checks import UsageError
from ..denoiser import map_tensors

__all__ = [
    "ConstantMemory",
    "Strategy",
    "available_strategies",
    "check_latent_gradient",
    "get_strategy",
    "randint",
    "register_strategy",
    "strategy_classes",
    "strategy_for",
]

_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`Strategy` subclass available to :func:`get_strategy` as ``name``."""

    def decorate(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise UsageError(f"strategy name {name!r} is already registered to {_REGISTRY[name].__name__}")
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError("register_strategy decorates Strategy subclasses")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_strategies(for_weights: bool = False) -> list[str]:
    """The registered names, sorted; ``for_weights``: only those that reward fine-tuning can train weights with
    (:meth:`Strategy.for_weights` is not None)."""
    return sorted(n for n, cls in _REGISTRY.items() if not for_weights or cls.trains_weights)


def strategy_classes() -> dict[str, type[Strategy]]:
    """The name table itself: name -> class, in the order of registration."""
    return dict(_REGISTRY)


def get_strategy(name: str | Strategy, **kwargs) -> Strategy:
    """``get_strategy("sdo", at="random")`` -> ``Shortcut(at="random")``; a Strategy instance passes through."""
    if isinstance(name, Strategy):
        if kwargs:
            raise UsageError("keyword arguments are only accepted with a strategy name")
        return name
    return _class(name)(**kwargs)


def strategy_for(name: str, *, weights: bool = False, steps: int, generator: torch.Generator | None = None,
                 k: int = 1) -> Strategy:
    """The method ``name`` as the table sets it up for a latent's gradient (``weights=False``:
    :meth:`Strategy.for_latents`) or for weights (:meth:`Strategy.for_weights`), over ``steps`` steps; ``k``: the
    truncation of the weights' DRaFT-K."""
    cls = _class(name)
    if not weights:
        check_latent_gradient(cls)
        return cls.for_latents(steps=steps, generator=generator)
    if not cls.trains_weights:
        raise UsageError(f"{name!r} does not train weights in fine-tuning here; use one of "
                         f"{', '.join(available_strategies(for_weights=True))}", "strategy")
    return cls.for_weights(steps=steps, generator=generator, k=k)


def check_latent_gradient(strategy: Strategy | type[Strategy]) -> None:
    """A :class:`~sdo.UsageError` for a method whose latent gets no gradient by design (ReFL, DRaFT-LV: their
    graph starts from a sample made without one), used where a latent's gradient is asked for."""
    cls = strategy if isinstance(strategy, type) else type(strategy)
    if not cls.gives_latent_gradient:
        raise UsageError(f"{cls.name or cls.__name__!r} gives no gradient to the latent that starts the chain (its "
                         "graph starts from a sample made without one): it trains weights (sdo.finetune); for a "
                         f"latent use one of {', '.join(n for n, c in _REGISTRY.items() if c.gives_latent_gradient)}",
                         "strategy")


def _class(name: str) -> type[Strategy]:
    if name not in _REGISTRY:
        raise UsageError(f"unknown strategy {name!r}; available: {', '.join(available_strategies())}", "strategy")
    return _REGISTRY[name]


def randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high], from ``generator`` (or torch's global RNG)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


class Strategy:
    """Base class. Subclasses choose the graph-keeping steps in :meth:`select` or override :meth:`run`."""

    name: ClassVar[str] = ""
    checkpoint: bool = False  # recompute the kept denoiser calls in backward instead of storing their activations
    trains_weights: ClassVar[bool] = True  # reward fine-tuning may train weights with it (see for_weights)
    gives_latent_gradient: ClassVar[bool] = True  # False: the latent that starts the chain gets none by design

    @classmethod
    def for_latents(cls, *, steps: int, generator: torch.Generator | None = None) -> Strategy:
        """The method at its best for the gradient of a latent over ``steps`` steps (what ``sdo bench`` times);
        by default the class's defaults, what ``get_strategy(name)`` gives ``sample`` and ``optimize_latent``."""
        return cls()

    @classmethod
    def for_weights(cls, *, steps: int, generator: torch.Generator | None = None, k: int = 1) -> Strategy:
        """The method as reward fine-tuning runs it for weights (``k``: DRaFT-K's truncation); only where
        ``trains_weights``."""
        return cls()

    def select(self, steps: range) -> range | set[int]:
        """Indices (within ``steps``) whose denoiser call keeps its graph; random choices are drawn here."""
        raise NotImplementedError

    def run(self, chain, x: torch.Tensor, state, steps: range) -> torch.Tensor:
        """Run ``chain`` over ``steps`` from ``x`` and return the last latent."""
        keep = self.select(steps)
        grad = torch.is_grad_enabled()
        for i in steps:
            if grad and i in keep and self.checkpoint:
                out = checkpoint(chain.denoise, i, x, use_reentrant=False)
            else:
                with torch.set_grad_enabled(grad and i in keep):
                    out = chain.denoise(i, x)
            x, state = chain.update(i, x, out, state)
        return x

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "generator")
        return f"{type(self).__name__}({args})"


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where a saved tensor was, in the layout of what a custom forward keeps for backward."""

    index: int


class _Backprop(torch.autograd.Function):
    """Attach a strategy's own forward (run without a graph) and backward to autograd. What the forward keeps for
    backward (stored states, the solver state's tensors) goes through ``save_for_backward``, so saved-tensor hooks
    (memory accounting, offloading) see it."""

    @staticmethod
    def forward(ctx, strategy, chain, state, steps, x, *params):
        ctx.strategy, ctx.chain, ctx.steps, ctx.params = strategy, chain, steps, params
        out, saved = strategy.forward(chain, x, state, steps)
        tensors = []  # (state, saved) is kept with each tensor replaced by its _Slot in save_for_backward's list
        ctx.layout = map_tensors(lambda t: tensors.append(t) or _Slot(len(tensors) - 1), (state, saved))
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        want_params = [ctx.needs_input_grad[5 + j] for j in range(len(ctx.params))]
        params = [p for p, w in zip(ctx.params, want_params, strict=True) if w]
        tensors = ctx.saved_tensors
        state, saved = map_tensors(lambda slot: tensors[slot.index], ctx.layout, leaf=_Slot)
        grad_x, grad_params = ctx.strategy.backward(ctx.chain, state, ctx.steps, saved, grad_out, params)
        it = iter(grad_params)
        return (None, None, None, None, grad_x, *(next(it) if w else None for w in want_params))


class ConstantMemory(Strategy):
    """Base of strategies with a hand-written backward pass (:class:`~sdo.Adjoint`, :class:`~sdo.Reversible`):
    the forward pass runs without a graph and :meth:`backward` recomputes what it needs.

    Gradients reach the latent and ``params``: by default every parameter of the chain's model and every
    conditioning tensor (``cond``, ``uncond``) that requires grad, as with :class:`Full`; pass an explicit list
    (like torchdiffeq's ``adjoint_params``) to restrict it, or ``()`` for the latent only.
    """

    # Their backward re-runs the denoiser outside the recorded forward pass, which fine-tuning's DRaFT+ penalty
    # (sdo.finetuning.anchor) does not see: they give gradients to weights (``params``) but do not train them here.
    trains_weights: ClassVar[bool] = False

    def __init__(self, params: Sequence[torch.Tensor] | None = None):
        self.params = None if params is None else tuple(params)

    def _params(self, chain) -> tuple[torch.Tensor, ...]:
        if self.params is not None:
            return self.params
        denoiser = chain.denoiser
        parameters = getattr(denoiser.model, "parameters", None)
        found = [p for p in parameters() if p.requires_grad] if parameters is not None else []
        for value in (denoiser.cond, denoiser.uncond or {}):  # e.g. a prompt embedding being optimized
            map_tensors(lambda t: found.append(t) if t.requires_grad else None, value)
        unique = {id(t): t for t in found}
        return tuple(unique.values())

    def run(self, chain, x, state, steps):
        params = self._params(chain) if torch.is_grad_enabled() else ()
        if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
            with torch.no_grad():
                return self.forward(chain, x, state, steps)[0]
        return _Backprop.apply(self, chain, state, steps, x, *params)

    def forward(self, chain, x: torch.Tensor, state, steps: range) -> tuple[torch.Tensor, Any]:
        """Run without a graph; return the result and what :meth:`backward` needs."""
        raise NotImplementedError

    def backward(self, chain, state, steps, saved, grad_out, params) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Gradients of the loss for the latent and for each of ``params``, given the result's gradient."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = [f"{k}={v!r}" for k, v in vars(self).items() if k != "params"]
        if self.params is not None:
            args.append(f"params=<{len(self.params)} tensors>")
        return f"{type(self).__name__}({', '.join(args)})"


def vjp(outputs, inputs, grad_outputs) -> list[torch.Tensor]:
    """``autograd.grad`` with zeros (not None) for inputs the outputs do not depend on."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if g is not None and o.requires_grad]
    if not pairs:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]
