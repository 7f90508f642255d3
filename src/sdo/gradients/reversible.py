"""DOODL (Wallace et al., ICCV 2023): gradients through an exactly invertible EDICT chain, in memory that does
not grow with the number of steps.

EDICT (Wallace, Gokul & Naik, CVPR 2023, Eqs. 14-15) samples two coupled sequences, x and y, both starting at
the latent. With S_i(z, e) the chain's own update of step i applied to z with model output e (for DDIM,
``a_t z + b_t e``) and D_i the denoiser of step i::

    x_inter = S_i(x, D_i(y))              y_inter = S_i(y, D_i(x_inter))
    x'      = p x_inter + (1 - p) y_inter  y'      = p y_inter + (1 - p) x'

Each line is inverted exactly given the other sequence, so the backward pass rebuilds (x, y) from (x', y')
instead of storing them. The two denoiser evaluations of the inversion are the forward pass's own (same
inputs, same step), so their graphs give the vector-Jacobian products: 2N forward evaluations in the forward
pass, 2N forwards with a graph and 2N backwards in the backward pass, about 8N forward-equivalents in all.

The result is the x sequence's final state: a different sample from the chain's own (EDICT is a coupled
sampler, close to the chain's output for p near 1), so this strategy's gradient is that of the EDICT chain,
not of the plain one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import UsageError
from ..inversion import check_ode
from .base import ConstantMemory, register_strategy, vjp

__all__ = ["Reversible", "edict_step"]


def edict_step(chain, i: int, x: torch.Tensor, y: torch.Tensor, state, p: float = 0.93):
    """One EDICT step of ``chain`` (Eqs. 14-15 of Wallace et al.): ``(x, y) -> (x', y')``."""
    x_inter = chain.update(i, x, chain.denoise(i, y), state)[0]
    y_inter = chain.update(i, y, chain.denoise(i, x_inter), state)[0]
    x_next = p * x_inter + (1 - p) * y_inter
    return x_next, p * y_inter + (1 - p) * x_next


@register_strategy("reversible")
class Reversible(ConstantMemory):
    """DOODL's gradient: EDICT coupled sampling with mixing weight ``p`` (0.93 by default), backpropagated by
    exact inversion instead of stored activations. Gradients reach the latent and ``params`` (default: the
    model's parameters that require grad). Needs a deterministic one-step solver (DDIM, DPM-Solver++ order 1,
    Euler, flow Euler).
    """

    def __init__(self, p: float = 0.93, params: Sequence[torch.Tensor] | None = None):
        super().__init__(params)
        if not 0.5 < float(p) <= 1.0:
            raise UsageError(f"p must be in (0.5, 1] for the EDICT coupling to be invertible and stable, got {p}")
        self.p = float(p)

    def forward(self, chain, x, state, steps):
        check_ode(chain, steps, "Reversible()")
        y = x
        for i in steps:
            x, y = edict_step(chain, i, x, y, state, self.p)
        return x, (x, y)

    def backward(self, chain, state, steps, saved, grad_out, params):
        p, (x, y) = self.p, saved
        grad_x, grad_y = grad_out, torch.zeros_like(grad_out)
        grad_params = [torch.zeros_like(t) for t in params]
        for i in reversed(steps):
            # invert the mixing (exact, linear)
            y_inter = (y - (1 - p) * x) / p
            x_inter = (x - (1 - p) * y_inter) / p
            # the mixing's adjoint
            grad_x = grad_x + (1 - p) * grad_y
            grad_y_inter = p * grad_y + (1 - p) * grad_x
            grad_x_inter = p * grad_x
            # y_inter = S(y, D(x_inter)): rebuild y; backpropagate into y, x_inter and params
            y, grad_y, grad, grads = _undo_half(chain, i, state, y_inter, x_inter, grad_y_inter, params)
            grad_x_inter = grad_x_inter + grad
            _accumulate(grad_params, grads)
            # x_inter = S(x, D(y)): rebuild x; backpropagate into x, y and params
            x, grad_x, grad, grads = _undo_half(chain, i, state, x_inter, y, grad_x_inter, params)
            grad_y = grad_y + grad
            _accumulate(grad_params, grads)
        return grad_x + grad_y, grad_params  # both sequences start at the latent


def _undo_half(chain, i, state, z_out, w, grad_z_out, params):
    """For one half of an EDICT step, ``z_out = S_i(z, D_i(w))``: rebuild z (exactly, given w), and carry
    ``grad_z_out`` back to z, w and ``params`` through the graph of that same denoiser evaluation."""
    with torch.enable_grad():
        w = w.detach().requires_grad_(True)
        out = chain.denoise(i, w)
        z = chain.solver.invert(i, z_out, out.detach(), state).detach()
        z_var = z.clone().requires_grad_(True)
        grads = vjp([chain.update(i, z_var, out, state)[0]], [z_var, w, *params], [grad_z_out])
    return z, grads[0], grads[1], grads[2:]


def _accumulate(total: list[torch.Tensor], grads) -> None:
    for t, g in zip(total, grads, strict=True):
        t.add_(g)
