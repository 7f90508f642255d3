"""Noise optimization: the initial noise of a few-step chain optimized against weighted rewards, as ReNO (Eyring et
al., NeurIPS 2024) and DNO (Tang et al., ICML 2025) do, with or without the regularizer that keeps the noise a
plausible Gaussian draw (:class:`~sdo.NormPrior`, ReNO's; :class:`~sdo.ProbabilityRegularizer`, DNO's).

:func:`optimize_noise_digits` runs on the embedded digits DDPM at a few DDIM steps (its shipped few-step student was
distilled for jumps from the second of ShortFT's segments on, so it cannot start from pure noise), with the digits
rewards, and the judge (a k-NN on the real digits that was not the reward) reading the samples before and after;
:func:`optimize_noise` on a local pipeline (an LCM-distilled or turbo model at 1-4 steps, or any other) with the
preference rewards of :func:`sdo.backbones.load_reward`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..backbones.pipeline import Pipeline
from ..backbones.vae import VAEDecoder
from ..chain import Chain
from ..checks import UsageError, check_int, check_number
from ..latent import NormPrior, ProbabilityRegularizer
from ..objectives.rewards import digits_reward
from .runs import TaskResult, noise_latent, optimize_decoded, replay, sample_before, task_chain

__all__ = ["REGULARIZERS", "noise_regularizer", "noise_statistics", "optimize_noise", "optimize_noise_digits"]

#: --regularizer name -> (class, its paper's weight)
REGULARIZERS = {"none": (None, 0.0), "reno": (NormPrior, 0.01), "dno": (ProbabilityRegularizer, 1.0)}


def noise_regularizer(name: str, weight: float | None = None, scale: float = 1.0) -> Callable | None:
    """The penalty ``--regularizer name`` at ``weight`` (default: its paper's), read on the standard-normal noise
    ``latent / scale`` (``scale``: the chain's ``init_noise_sigma``); None for ``"none"``."""
    if name not in REGULARIZERS:
        raise UsageError(f"unknown regularizer {name!r}; use one of {', '.join(REGULARIZERS)}", "regularizer")
    cls, default = REGULARIZERS[name]
    if cls is None:
        if weight:
            raise UsageError("--reg-weight needs a --regularizer (reno or dno)", "reg_weight")
        return None
    prior = cls(default if weight is None else check_number("reg_weight", weight, minimum=0))
    return prior if scale == 1.0 else (lambda latent: prior(latent / scale))


def noise_statistics(noise: torch.Tensor) -> dict:
    """How Gaussian each item of a standard-normal-scaled ``noise`` still looks: |z| / sqrt(d) (about 1 for a
    draw), ReNO's norm penalty and DNO's probability penalty at weight 1 (0 for a typical draw)."""
    noise = noise.detach().float().cpu()
    return {"norm_ratio": (noise.flatten(1).norm(dim=1) / noise[0].numel() ** 0.5).tolist(),
            "reno_penalty": NormPrior(1.0)(noise).tolist(), "dno_penalty": ProbabilityRegularizer(1.0)(noise).tolist()}


def _settings(regularizer: str, weight: float | None) -> dict:
    return {"regularizer": regularizer, "reg_weight": REGULARIZERS[regularizer][1] if weight is None else weight}


def _common(iterations, lr, count) -> None:
    check_int("iterations", iterations, minimum=1)
    check_number("lr", lr, above=0)
    check_int("count", count, minimum=1)


def optimize_noise_digits(reward: str = "class", target: int = 3, *, count: int = 8, steps: int = 10,
                          regularizer: str = "none", weight: float | None = None, iterations: int = 30,
                          lr: float = 0.05, strategy="full", seed: int = 0, device="cpu", models=None, judge=None,
                          progress: bool = True) -> TaskResult:
    """``count`` initial noises of the unconditional digits DDPM at ``steps`` DDIM steps, optimized with Adam for
    ``iterations`` to raise ``reward`` (``NAME[:weight],...`` of ``class``, the classifier's log p(``target``), and
    ``ink``). Metrics: the reward, the classifier's and the judge's reading (share of ``target``, share the judge
    calls no digit) of the first sample and of each noise's best one, and :func:`noise_statistics` of the noise before
    the first update and after the last."""
    from ..embedded import load_digits
    from ..embedded.judge import DigitJudge

    _common(iterations, lr, count)
    check_int("target", target, minimum=0, maximum=9)
    models = models or load_digits(device)
    score = digits_reward(reward, models.classifier, target)
    penalty = noise_regularizer(regularizer, weight)
    judge = judge or DigitJudge(device=device)
    null = torch.full((count,), models.null_class, device=device)
    chain = Chain.from_diffusers(models.unet, models.scheduler, check_int("steps", steps, minimum=1),
                                 cond={"class_labels": null})
    noise = torch.randn(count, 1, models.image_size, models.image_size, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(device)

    def objective(x0):
        return -score(x0, [models.null_class] * x0.shape[0])

    identity = lambda x: x
    _, before = sample_before(chain, noise, 0, identity)
    after, result = optimize_decoded(chain, noise, 0, objective, identity, strategy, iterations, lr, progress,
                                     regularizer=penalty)
    with torch.no_grad():
        metrics = {"reward": reward, "target": target, "steps": steps, **_settings(regularizer, weight)}
        for name, images in (("before", before), ("after", after)):
            said = models.classifier(images.clamp(-1, 1)).argmax(1)
            judged = judge(images)
            metrics[f"reward_{name}"] = score(images, [models.null_class] * count).tolist()
            metrics[f"classifier_target_{name}"] = float((said == target).float().mean())
            metrics[f"judge_target_{name}"] = float((judged == target).float().mean())
            metrics[f"judge_rejected_{name}"] = float((judged < 0).float().mean())
        for name, z in (("before", noise), ("after", result.latent)):
            metrics.update({f"{k}_{name}": v for k, v in noise_statistics(z).items()})
    return TaskResult(before, after, result, metrics)


def optimize_noise(pipe: Pipeline, reward: Callable, prompt: str, *, steps: int = 4, guidance_scale: float = 1.0,
                   scheduler: str | None = None, regularizer: str = "none", weight: float | None = None,
                   iterations: int = 30, lr: float = 0.05, strategy="full", seed: int = 0,
                   checkpoint_vae: bool = False, progress: bool = True) -> TaskResult:
    """The initial noise of ``pipe`` at ``steps`` steps (one image of ``prompt``), optimized with Adam to raise
    ``reward(images, prompts)`` (e.g. :func:`sdo.backbones.load_reward`'s weighted sum), decoded through the VAE
    in the graph. Metrics: the reward of the first sample and of the best one, and :func:`noise_statistics` of the
    noise before the first update and after the last."""
    _common(iterations, lr, 1)
    chain = task_chain(pipe, prompt, check_int("steps", steps, minimum=1), guidance_scale, scheduler)
    scale = float(chain.init_noise_sigma)
    penalty = noise_regularizer(regularizer, weight, scale)
    generator = torch.Generator().manual_seed(seed)
    noise = noise_latent(pipe, chain, 0, generator)
    decode = VAEDecoder(pipe.vae, checkpoint=checkpoint_vae)

    def objective(images):
        return -reward(images, [prompt] * images.shape[0]).float()

    _, before = sample_before(chain, noise, 0, decode, replay(generator))
    after, result = optimize_decoded(chain, noise, 0, objective, decode, strategy, iterations, lr, progress,
                                     generator=generator, regularizer=penalty)
    with torch.no_grad():
        metrics = {"steps": steps, **_settings(regularizer, weight),
                   "reward_before": reward(before, [prompt]).tolist(), "reward_after": reward(after, [prompt]).tolist()}
        for name, z in (("before", noise), ("after", result.latent)):
            metrics.update({f"{k}_{name}": v for k, v in noise_statistics(z / scale).items()})
    return TaskResult(before, after, result, metrics)
