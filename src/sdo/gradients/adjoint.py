"""AdjointDPM (Pan et al., ICLR 2024): gradients of a sampling chain without storing its graph.

The forward pass samples without a graph. The backward pass carries the adjoint a_i = dJ/dx_i from x0 back
to the latent, one step at a time, with the chain's own discretization (its solver's update rule):

    a_i = a_{i+1} . d x_{i+1} / d x_i,      dJ/dtheta += a_{i+1} . d x_{i+1} / d theta

``Adjoint()`` (continuous, the paper's method) stores only x0. It rebuilds x_i from x_{i+1} by running the
probability-flow ODE backwards (one explicit step, the chain's update inverted with the denoiser output at
x_{i+1}), then takes the vector-Jacobian product of the denoiser at the rebuilt x_i; that evaluation is also
what rebuilds x_{i-1}. Each step costs one forward with a graph and one backward: 4N + 1 forward-equivalents
per gradient with the forward pass. Its gradient differs from backpropagation's only by the reconstruction
error (x_i rebuilt, not the x_i that was sampled), which :func:`reconstruction_error` measures. It shrinks as
the steps get finer, but the backward ODE amplifies it: a sharp pixel model (the embedded digits DDPM) loses
most of x_T in 50 steps, and the gradient's cosine with Full's falls to 0.85-1 depending on the sample (see
docs/benchmarks.md). Smooth latent models fare better.

``Adjoint(exact=True)`` is the discrete adjoint: it stores every x_i (and the solver's state) in the forward
pass and recomputes each step with a graph in backward, so its gradient equals backpropagation's to
round-off for every solver (multistep and stochastic ones included), in 4N forward-equivalents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..chain import step_range
from ..inversion import check_ode, rebuild, rebuilt_states
from .base import ConstantMemory, register_strategy, vjp

__all__ = ["Adjoint", "reconstruction_error"]


@register_strategy("adjoint")
class Adjoint(ConstantMemory):
    """AdjointDPM. ``exact=False``: continuous adjoint, memory of one step whatever N; ``exact=True``:
    discrete adjoint over stored states, equal to :class:`~sdo.Full`'s gradient.

    ``params``: the tensors that receive gradients besides the latent (default: the model's parameters that
    require grad), like torchdiffeq's ``adjoint_params``.
    """

    def __init__(self, exact: bool = False, params: Sequence[torch.Tensor] | None = None):
        super().__init__(params)
        self.exact = bool(exact)

    def check_solver(self, chain, steps) -> None:
        """Raise unless this adjoint can run over ``steps`` of ``chain`` (the continuous one needs an ODE solver)."""
        if not self.exact:
            check_ode(chain, steps, "Adjoint() (use Adjoint(exact=True) for any solver)")

    def forward(self, chain, x, state, steps):
        self.check_solver(chain, steps)
        stored = []
        for i in steps:
            if self.exact:
                stored.append((x, state))
            x, state = chain.step(i, x, state)
        return x, (stored if self.exact else x)

    def backward(self, chain, state, steps, saved, grad_out, params):
        grad_params = [torch.zeros_like(p) for p in params]
        adjoint, adjoint_history = grad_out, ()
        if not self.exact:
            x, out = saved, None
        for i in reversed(steps):
            if self.exact:
                x_i, state_i = saved[i - steps.start]
                adjoint, adjoint_history, grads = self._exact_step(chain, i, x_i, state_i, adjoint, adjoint_history,
                                                                   params)
            else:
                x = rebuild(chain, i, x, out, state)
                adjoint, out, grads = self._continuous_step(chain, i, x, state, adjoint, params)
            for g, d in zip(grad_params, grads, strict=True):
                g.add_(d)
        return adjoint, grad_params

    @staticmethod
    def _exact_step(chain, i, x, state, adjoint, adjoint_history, params):
        """Backpropagate one step: recompute it with a graph from the stored (x_i, state_i)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            history = tuple(h.detach().requires_grad_(True) for h in state.history)
            x_next, state_next = chain.step(i, x, replace(state, history=history))
            outputs = [x_next, *state_next.history]
            grad_outputs = [adjoint, *(adjoint_history or [None] * len(state_next.history))]
            grads = vjp(outputs, [x, *history, *params], grad_outputs)
        n = len(history)
        return grads[0], tuple(grads[1 : 1 + n]), grads[1 + n :]

    @staticmethod
    def _continuous_step(chain, i, x, state, adjoint, params):
        """Carry the adjoint across step i at the rebuilt x_i: one denoiser evaluation with a graph and its
        VJP. The evaluation is returned too: it is what rebuilds x_{i-1}."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            out = chain.denoise(i, x)
            grads = vjp([chain.update(i, x, out, state)[0]], [x, *params], [adjoint])
        return grads[0], out.detach(), grads[1:]


def reconstruction_error(chain, x: torch.Tensor, *, start: int = 0, generator=None) -> list[float]:
    """How far :class:`Adjoint`'s rebuilt states are from the sampled ones: the relative error
    ``|x_i_rebuilt - x_i| / |x_i|`` for every step ``i`` from ``start``, latent first. Costs 2 sampling passes."""
    steps = step_range(chain, start)
    with torch.no_grad():
        state = chain.init_state(x, generator)
        Adjoint().check_solver(chain, steps)
        sampled = [x]
        for i in steps:
            sampled.append(chain.step(i, sampled[-1], state)[0])
        errors = []
        for i, x_i in rebuilt_states(chain, sampled[-1], steps, state):
            truth = sampled[i - steps.start]
            errors.append(float((x_i - truth).norm() / truth.norm()))
    return errors[::-1]
