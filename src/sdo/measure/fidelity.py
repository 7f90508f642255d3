"""How good an approximate gradient is: agreement with backpropagation's, and the growth of gradient norms
with backpropagation depth (the SDO paper's Fig. 11a)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..chain import Chain, step_range
from ..checks import UsageError
from ..gradients import Strategy, get_strategy
from ..sampling import sample

__all__ = ["GradientFidelity", "gradient_fidelity", "gradient_norm_by_depth", "strategy_gradient"]

StrategySpec = str | Strategy


def _named(strategies: Iterable[StrategySpec] | Mapping[str, StrategySpec]) -> dict[str, StrategySpec]:
    if isinstance(strategies, Mapping):
        return dict(strategies)
    named = {}
    for s in strategies:
        named[s if isinstance(s, str) else repr(s)] = s
    return named


def strategy_gradient(
    chain: Chain,
    x: torch.Tensor,
    objective: Callable[[torch.Tensor], torch.Tensor],
    strategy: StrategySpec,
    *,
    params: Sequence[torch.Tensor] = (),
    start: int = 0,
    seed: int = 0,
) -> list[torch.Tensor]:
    """The gradient of ``objective(sample(chain, x, strategy=..., start=...)).sum()`` with respect to ``x`` and
    each of ``params`` (first item: the latent's). ``seed`` seeds the solver's noise, so every strategy sees the
    same trajectory."""
    latent = x.detach().clone().requires_grad_(True)
    generator = torch.Generator(x.device).manual_seed(seed)
    x0 = sample(chain, latent, strategy=get_strategy(strategy), start=start, generator=generator)
    return list(torch.autograd.grad(objective(x0).sum(), [latent, *params], allow_unused=True))


@dataclass(frozen=True)
class GradientFidelity:
    """Agreement of a gradient ``g`` with the reference gradient ``r`` (Full's)."""

    cosine: float  # cos(g, r) over everything (latent, then params), flattened
    norm_ratio: float  # |g| / |r|
    item_cosine: tuple[float, ...]  # per batch item, for the latent's gradient


def _fidelity(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> GradientFidelity:
    flat = [torch.cat([g.flatten() for g in gs]).double() for gs in (grads, reference)]
    cos = torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0)
    items = torch.nn.functional.cosine_similarity(grads[0].flatten(1).double(), reference[0].flatten(1).double(), dim=1)
    return GradientFidelity(float(cos), float(flat[0].norm() / flat[1].norm()), tuple(items.tolist()))


def gradient_fidelity(
    chain: Chain,
    x: torch.Tensor,
    objective: Callable[[torch.Tensor], torch.Tensor],
    strategies: Iterable[StrategySpec] | Mapping[str, StrategySpec],
    *,
    reference: StrategySpec = "full",
    params: Sequence[torch.Tensor] = (),
    start: int = 0,
    seed: int = 0,
) -> dict[str, GradientFidelity]:
    """For each strategy, the cosine similarity and norm ratio of its gradient (for ``x`` and ``params``) to
    the ``reference`` strategy's (Full backpropagation by default), on the same latent and noise.

    ``strategies``: names, instances, or a mapping label -> strategy. Randomized strategies draw from their own
    generators, so seed those for repeatable figures.
    """
    named = _named(strategies)
    ref = strategy_gradient(chain, x, objective, reference, params=params, start=start, seed=seed)
    if any(g is None for g in ref):
        raise UsageError("the objective does not depend on some of params under the reference strategy")
    out = {}
    for label, strategy in named.items():
        grads = strategy_gradient(chain, x, objective, strategy, params=params, start=start, seed=seed)
        grads = [torch.zeros_like(r) if g is None else g for g, r in zip(grads, ref, strict=True)]
        out[label] = _fidelity(grads, ref)
    return out


def gradient_norm_by_depth(
    chain: Chain,
    x: torch.Tensor,
    objective: Callable[[torch.Tensor], torch.Tensor],
    depths: Sequence[int],
    strategies: Iterable[StrategySpec] | Mapping[str, StrategySpec] = ("full", "sdo"),
    *,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Fig. 11a of the SDO paper: the norm of the gradient of ``objective(x0)`` with respect to the latent
    ``d`` steps before the end of the chain (the latent at step ``N - d``, reached from ``x`` by no-grad
    sampling), for each depth ``d``. Returns, per strategy, the mean over the batch of the per-item norms.
    In the paper backpropagation's norm explodes with depth while SDO's stays flat; on the embedded digits
    model it is the other way round (docs/benchmarks.md), so measure it for the model at hand."""
    n = len(chain)
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= n:
            raise UsageError(f"depths must be ints in 1..{n} (the chain's steps), got {d!r}")
    named = _named(strategies)
    generator = torch.Generator(x.device).manual_seed(seed)
    with torch.no_grad():  # the latents at every depth, on one trajectory
        state = chain.init_state(x, generator)
        latents = [x]
        for i in step_range(chain):
            latents.append(chain.step(i, latents[-1], state)[0])
    norms: dict[str, list[float]] = {label: [] for label in named}
    for d in depths:
        start = n - d
        for label, strategy in named.items():
            (g,) = strategy_gradient(chain, latents[start], objective, strategy, start=start, seed=seed)
            norms[label].append(float(g.flatten(1).norm(dim=1).mean()))
    return norms
