"""``optimize_latent``: gradient descent on a chain's latent (the initial noise, or the latent at a later step)
to lower ``objective(x0)`` (Eq. 10 of Dou et al., 2025, over x_N only; Sec. 5.1's tasks), optionally with a penalty
that keeps the noise Gaussian: ReNO's norm prior (:class:`NormPrior`) or DNO's probability regularizer
(:class:`ProbabilityRegularizer`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .chain import Chain, step_range
from .checks import UsageError, check_int, check_number
from .gradients import Shortcut, Strategy, check_latent_gradient, get_strategy
from .picard import Picard
from .sampling import sample

__all__ = ["LatentResult", "LinfBall", "NormPrior", "ProbabilityRegularizer", "optimize_latent"]

_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class LinfBall:
    """Projection onto the L-infinity ball of ``radius`` around the starting latent (adversarial tasks)."""

    def __init__(self, radius: float):
        self.radius = check_number("radius", radius, above=0)

    def __call__(self, latent: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        return origin + (latent - origin).clamp(-self.radius, self.radius)

    def __repr__(self) -> str:
        return f"LinfBall({self.radius})"


class NormPrior:
    """ReNO's noise regularizer (Eyring et al., NeurIPS 2024, "ReNO", Sec. 3): the norm r = |z| of a standard
    Gaussian z in d dimensions follows the chi distribution, so the penalty is ``weight`` times its negative
    log-likelihood, r^2 / 2 - (d - 1) log r, shifted to 0 at its minimum r = sqrt(d - 1); one value per item (d: the
    item's size). ReNO's weight: 0.01."""

    def __init__(self, weight: float = 0.01):
        self.weight = check_number("weight", weight, minimum=0)

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        d = latent[0].numel()
        r2 = latent.flatten(1).double().square().sum(1)
        nll = r2 / 2 - (d - 1) / 2 * r2.log()
        lowest = (d - 1) / 2 - (d - 1) / 2 * math.log(d - 1)
        return (self.weight * (nll - lowest)).to(latent.dtype)

    def __repr__(self) -> str:
        return f"NormPrior(weight={self.weight})"


class ProbabilityRegularizer:
    """DNO's probability regularization (Tang et al., ICML 2025, "Inference-Time Alignment of Diffusion Models with
    Direct Noise Optimization", Sec. 5): if z ~ N(0, I), its D elements cut into n = D // ``block`` blocks are n
    draws of N(0, I_block), whose mean m and second moment C = (1/n) sum_k b_k b_k^T concentrate:

        log P(mean this far)       <= -n |m|^2 / (2 block)
        log P(moment this far)     <= -n max(sqrt(1 + |C - I|_2) - 1 - sqrt(block / n), 0)^2 / 2,

    each capped at -log 2, so that a typical z pays nothing. The penalty is ``weight`` times minus the two log-bounds,
    averaged over the stored order and ``shuffles`` random permutations of the elements (drawn anew at every call,
    from ``seed``), shifted to 0 for a typical z; one value per item. An optimized noise that leaves the Gaussian
    shell (DNO's out-of-distribution reward hacking) pays for it."""

    def __init__(self, weight: float = 1.0, block: int = 4, shuffles: int = 20, seed: int = 0):
        self.weight = check_number("weight", weight, minimum=0)
        self.block, self.shuffles = check_int("block", block, minimum=2), check_int("shuffles", shuffles, minimum=0)
        self.generator = torch.Generator().manual_seed(int(seed))

    def _log_bounds(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B,): the two capped log-bounds of each row's blocks, summed."""
        n = flat.shape[1] // self.block
        blocks = flat[:, : n * self.block].reshape(flat.shape[0], n, self.block)
        mean = blocks.mean(1)
        moment = blocks.transpose(1, 2) @ blocks / n
        spread = torch.linalg.matrix_norm(moment - torch.eye(self.block, dtype=flat.dtype), ord=2)
        cap = -math.log(2)
        log_mean = (-n * mean.square().sum(1) / (2 * self.block)).clamp(max=cap)
        excess = ((1 + spread).sqrt() - 1 - math.sqrt(self.block / n)).clamp(min=0)
        return log_mean + (-n * excess.square() / 2).clamp(max=cap)

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        flat = latent.flatten(1).double()
        if flat.shape[1] < 2 * self.block:
            raise UsageError(f"the probability regularizer needs at least 2 blocks of {self.block} elements per item, "
                             f"got {flat.shape[1]}")
        orders = [flat] + [flat[:, torch.randperm(flat.shape[1], generator=self.generator)]
                           for _ in range(self.shuffles)]
        log_bound = torch.stack([self._log_bounds(o) for o in orders]).mean(0)
        return (self.weight * (-log_bound - 2 * math.log(2))).to(latent.dtype)

    def __repr__(self) -> str:
        return f"ProbabilityRegularizer(weight={self.weight}, block={self.block}, shuffles={self.shuffles})"


@dataclass
class LatentResult:
    """What :func:`optimize_latent` found. Losses are per batch item unless the objective returned a scalar."""

    latent: torch.Tensor  # the optimized latent, after the last update (and projection)
    sample: torch.Tensor  # the sample of ``latent``
    final_loss: torch.Tensor  # the objective of ``sample``
    best_sample: torch.Tensor  # per item, the sample with the lowest loss seen (as the paper records)
    best_loss: torch.Tensor  # per item, that lowest loss
    losses: list[float] = field(default_factory=list)  # mean loss at each iteration, before its update
    item_losses: torch.Tensor | None = None  # (iterations, items): every loss seen
    seconds: float = 0.0  # wall time of the whole optimization
    picard_runs: list[tuple[int, int]] = field(default_factory=list)  # with picard: (sweeps, calls) per iteration
    penalties: list[float] = field(default_factory=list)  # with a regularizer: its mean at each iteration


def _make_optimizer(optimizer, params, lr):
    if isinstance(optimizer, str):
        if optimizer not in _OPTIMIZERS:
            raise UsageError(f"unknown optimizer {optimizer!r}; use one of {sorted(_OPTIMIZERS)} or a callable")
        return _OPTIMIZERS[optimizer](params, lr=lr)
    if callable(optimizer):
        return optimizer(params, lr=lr)
    raise TypeError(f"optimizer must be a name or a callable(params, lr=...), got {type(optimizer).__name__}")


def _item_losses(loss: torch.Tensor, batch: int, iteration: int) -> torch.Tensor:
    if not torch.is_tensor(loss):
        raise TypeError(f"objective must return a tensor, got {type(loss).__name__}")
    if loss.ndim > 0 and tuple(loss.shape) != (batch,):
        raise UsageError(f"objective returned shape {tuple(loss.shape)}: "
                         f"expected a scalar or one loss per item, shape ({batch},)")
    if not torch.isfinite(loss).all():
        raise UsageError(f"non-finite loss at iteration {iteration}: {loss.detach().flatten().tolist()}")
    return loss.reshape(-1)


def _name(objective) -> str:
    return getattr(objective, "__name__", None) or type(objective).__name__


def _check_gradient_path(grad: torch.Tensor, grad_x0: torch.Tensor, strategy) -> None:
    """Items whose loss has a gradient at x0 but whose latent got exactly none: the chain cut the path."""
    dims = tuple(range(1, grad.ndim))
    cut = (grad_x0.abs().amax(dim=dims) > 0) & (grad.abs().amax(dim=dims) == 0)
    if cut.any():
        raise UsageError(
            f"the objective has a gradient at the sample but the latent receives none under {strategy!r} "
            f"(items {cut.nonzero().flatten().tolist()}): some step's update does not depend on its input "
            "except through a denoiser call kept without a graph (e.g. DDIM with prediction_type='sample' and "
            "set_alpha_to_one=True at its last step), or a clamp (clip_sample) is active everywhere. Use a "
            "strategy that keeps that step's graph, such as Truncated(1) or Full"
        )


def optimize_latent(
    chain: Chain,
    x: torch.Tensor,
    objective: Callable[[torch.Tensor], torch.Tensor],
    *,
    strategy: str | Strategy = "sdo",
    start: int = 0,
    iterations: int = 50,
    lr: float = 0.01,
    optimizer: str | Callable = "adam",
    step_rule: str = "plain",
    constraint: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], bool | None] | None = None,
    progress: bool = True,
    generator: torch.Generator | None = None,
    picard: bool | Picard = False,
    regularizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LatentResult:
    """Optimize the latent ``x`` at step ``start`` so that ``objective(sample(chain, x))`` decreases.

    ``objective(x0)`` returns a scalar or one loss per batch item (summed for the gradient, so items do not
    interact). Each iteration samples with ``strategy``, takes the gradient with respect to the latent only,
    and updates it with ``optimizer`` ("adam", "adamw", "sgd" or ``callable(params, lr=...)``) on the gradient
    (``step_rule="plain"``) or on its sign (``"sign"``: with "sgd", sign-gradient PGD, the standard L-infinity attack
    of Madry et al., 2018, whose step does not depend on the gradient's scale); ``constraint``
    (e.g. :class:`LinfBall`) projects the latent after every update. ``callback(iteration, x0, loss)`` may
    return True to stop early. Stochastic solvers use the same noise in every iteration (from ``generator``,
    or a seed drawn once from torch's global RNG).

    ``picard=True``: SDO's forward pass by Picard sweeps (:class:`~sdo.Picard`), each iteration warm-started from
    the previous iteration's trajectory, for the latent moved by one optimizer step is close to it; pass a
    :class:`~sdo.Picard` to choose the window, tolerance or warm start. The strategy must be ``"sdo"``. The
    iterations' losses (and ``best_sample``) come from those forward passes, within the tolerance of the
    sequential ones; ``sample`` and ``final_loss`` are sequential.

    ``regularizer(latent)``: a penalty of the latent itself, one value per item, whose gradient is added to the
    objective's (:class:`NormPrior`, ReNO's; :class:`ProbabilityRegularizer`, DNO's); the losses recorded (and
    ``best_sample``) are the objective's, the penalties are in ``penalties``. Several rewards with weights (ReNO's
    multi-reward objective) are one objective: :class:`~sdo.objectives.WeightedSum`, or a
    :class:`~sdo.objectives.rewards.WeightedReward` negated.
    """
    steps = step_range(chain, start)
    if step_rule not in ("plain", "sign"):
        raise UsageError(f"step_rule must be 'plain' or 'sign', got {step_rule!r}")
    strategy = get_strategy(strategy)
    check_latent_gradient(strategy)
    if picard:
        if not isinstance(strategy, Shortcut):
            raise UsageError(f"picard runs SDO's forward pass: it needs strategy='sdo' (a Shortcut), got {strategy!r}")
        picard = Picard(warm_start=True) if picard is True else picard
        if not isinstance(picard, Picard):
            raise TypeError(f"picard must be True or an sdo.Picard, got {type(picard).__name__}")
        strategy = Shortcut(at=strategy.at, generator=strategy.generator, picard=picard)
    picard = strategy.picard if isinstance(strategy, Shortcut) else None
    sweeps = []  # with picard: each iteration's PicardResult (the last one's trajectory warm-starts the next run)
    iterations = check_int("iterations", iterations, minimum=1)
    lr = check_number("lr", lr, above=0)
    chain.check(x)
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
    noise_seed = generator.get_state()

    def run(latent, sequential=False):
        """The sample of ``latent`` with the run's noise: with picard by sweeps (warm-started from the last run's
        trajectory when asked), unless ``sequential``, the exact sample."""
        generator.set_state(noise_seed)
        if picard is None or sequential:
            return sample(chain, latent, strategy="full" if picard else strategy, start=steps.start,
                          generator=generator)
        init = sweeps[-1].trajectory if picard.warm_start and sweeps else None
        x0, result = strategy.run_sweeps(chain, latent, chain.init_state(latent, generator), steps, init)
        sweeps.append(result)
        return x0

    origin = x.detach().clone()
    latent = origin.clone().requires_grad_(True)
    opt = _make_optimizer(optimizer, [latent], lr)
    batch = x.shape[0]
    history, best_loss, best_sample, penalties = [], None, None, []

    def track(x0, loss):
        nonlocal best_loss, best_sample
        x0 = x0.detach()
        if best_loss is None:
            best_loss, best_sample = loss.clone(), x0.clone()
            return
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        if loss.numel() == 1:
            best_sample = x0.clone() if bool(better) else best_sample
        else:
            best_sample = torch.where(better.view(-1, *([1] * (x0.ndim - 1))), x0, best_sample)

    began = time.perf_counter()
    bar = tqdm(range(iterations), desc=f"optimize_latent[{strategy.name or type(strategy).__name__}]",
               disable=not progress)
    for it in bar:
        opt.zero_grad(set_to_none=True)
        x0 = run(latent)
        loss = objective(x0)
        items = _item_losses(loss, batch, it)
        if not loss.requires_grad:
            raise UsageError(
                "objective(x0) does not depend on the sample: its value carries no gradient. Check that the "
                "objective uses its argument and does not detach it or run under torch.no_grad()"
            )
        grad, grad_x0 = torch.autograd.grad(loss.sum(), [latent, x0], allow_unused=True)
        if grad is None or grad_x0 is None:
            raise UsageError("objective(x0) does not depend on the sample: the latent received no gradient")
        if it == 0 and not bool(grad_x0.any()):  # later, a satisfied hinge (a margin reached) may be exactly flat
            raise UsageError(f"the gradient of the objective {_name(objective)} at the sample is exactly zero: it does "
                             "not change with x0 (it rounds, thresholds or multiplies it by zero), so nothing would "
                             "be optimized; use a differentiable objective")
        _check_gradient_path(grad, grad_x0, strategy)
        if regularizer is not None:
            penalty = regularizer(latent)
            if not torch.is_tensor(penalty) or tuple(penalty.shape) != (batch,):
                raise UsageError(f"regularizer returned {getattr(penalty, 'shape', type(penalty).__name__)}: expected "
                                 f"one penalty per item, shape ({batch},)")
            grad = grad + torch.autograd.grad(penalty.sum(), latent)[0]
            penalties.append(penalty.detach().mean().item())
        if not torch.isfinite(grad).all():
            raise UsageError(f"non-finite gradient at iteration {it}; lower lr or use strategy='sdo'")
        items = items.detach()
        history.append(items)
        track(x0, items)
        bar.set_postfix(loss=f"{items.mean().item():.4g}", **({"sweeps": sweeps[-1].sweeps} if sweeps else {}))
        latent.grad = grad.sign() if step_rule == "sign" else grad
        opt.step()
        if constraint is not None:
            with torch.no_grad():
                latent.copy_(constraint(latent, origin))
        if callback is not None and callback(it, x0.detach(), items):
            break
    with torch.no_grad():
        final = run(latent, sequential=True)
        final_loss = _item_losses(objective(final), batch, len(history))
    track(final, final_loss)
    stacked = torch.stack(history)
    return LatentResult(
        latent=latent.detach(),
        sample=final,
        final_loss=final_loss,
        best_sample=best_sample,
        best_loss=best_loss,
        losses=stacked.mean(dim=1).tolist(),
        item_losses=stacked,
        seconds=time.perf_counter() - began,
        picard_runs=[(r.sweeps, r.calls) for r in sweeps],
        penalties=penalties,
    )
