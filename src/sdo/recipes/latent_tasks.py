"""The paper's latent tasks on a local diffusers text-to-image pipeline (Sec. 5.1 of Dou et al., 2025):
text-guided editing of a real image (Eq. 23), style-guided generation (Eq. 24) and aesthetic enhancement
(Eq. 25). Each one builds a chain from the pipeline, picks the latent to optimize (a real image's DDIM inversion
at ``start_step``, or noise run to ``start_step``), and runs :func:`~sdo.optimize_latent` on an objective of the
decoded image.

Defaults are the paper's: 50 DDIM steps, Adam lr 0.01; 50 iterations for editing (lambda 0.7), 150 for style,
100 for aesthetic, starting at t ~ 600 for style and aesthetic.

Backbones: Stable Diffusion 1.x/2.x UNets, PixArt transformers and LCM-distilled UNets, each conditioned as its
diffusers pipeline does (:mod:`sdo.backbones`). Schedulers: the pipeline's own where sdo supports it, else DDIM,
or the one named by ``scheduler=`` ("ddim", "dpm-solver++", "lcm", "euler"). Editing, and aesthetic enhancement of
a real image, invert the image with the sampler, which needs a deterministic one-step scheduler (DDIM, Euler).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..backbones.conditioning import task_scheduler
from ..backbones.pipeline import Pipeline, load_image
from ..backbones.vae import VAEDecoder
from ..chain import Chain, step_range
from ..checks import UsageError, check_int
from ..inversion import check_ode, invert
from ..latent import LinfBall
from ..objectives.clip import AestheticScore, CLIPGramStyle, CLIPTextSimilarity
from ..objectives.image import Clamped, ClassifierCrossEntropy, ClassifierMargin, Fidelity, WeightedSum
from .runs import TaskResult, noise_latent, optimize_decoded, replay, sample_before, step_at, task_chain, where

__all__ = [
    "TaskResult",
    "adversarial",
    "aesthetic",
    "edit",
    "edit_digits",
    "load_digit_image",
    "step_at",
    "style",
]


def _invert(chain: Chain, latents: torch.Tensor, start: int, task: str) -> torch.Tensor:
    """DDIM inversion of ``latents`` to step ``start``, with an error that names the way out when the chain's
    scheduler cannot run backwards (LCM re-noises every step; 2nd-order DPM-Solver++ reads the previous step)."""
    try:
        check_ode(chain, step_range(chain, start), f"{task} (DDIM inversion of the image)")
    except ValueError as err:
        raise UsageError(f"{err}. Pass scheduler='ddim' (command line: --scheduler ddim) to invert and sample "
                         "with DDIM") from None
    return invert(chain, latents, start)


def _encoded(pipe: Pipeline, decode: VAEDecoder, image: torch.Tensor) -> torch.Tensor:
    """The latents of ``image``, in the denoiser's dtype (a VAE kept in float32 under a float16 base, as SDXL's
    ``force_upcast`` asks, encodes in float32)."""
    return decode.encode(image).to(next(pipe.denoiser.parameters()).dtype)


def edit(pipe: Pipeline, clip, clip_tokenizer, image: torch.Tensor, prompt: str, *, lam: float = 0.7,
         start_t: int = 600, steps: int = 50, guidance_scale: float = 1.0, scheduler: str | None = None,
         strategy="sdo", iterations: int = 50, lr: float = 0.01, checkpoint_vae: bool = False,
         progress: bool = True, callback=None) -> TaskResult:
    """Text-guided editing of a real image (Eq. 23): invert it to the step nearest ``start_t``, then minimize
    ``CLIP(x0, prompt) + lam * |x0 - image|_1`` over that latent. The inversion needs a deterministic one-step
    scheduler: a ValueError says to pass ``scheduler="ddim"`` for LCM or 2nd-order DPM-Solver++.
    ``callback(iteration, x0, loss)``: :func:`~sdo.optimize_latent`'s (True stops early)."""
    chain = task_chain(pipe, prompt, steps, guidance_scale, scheduler)
    start = step_at(chain, start_t)
    decode = VAEDecoder(pipe.vae, checkpoint=checkpoint_vae)
    image = image.to(pipe.device)
    latents = _encoded(pipe, decode, image)
    latent = _invert(chain, latents, start, "edit")
    clip_term = CLIPTextSimilarity(clip, prompt, clip_tokenizer)
    objective = WeightedSum([(1.0, clip_term), (lam, Fidelity(image.float()))])
    x0_before, before = sample_before(chain, latent, start, decode)
    after, result = optimize_decoded(chain, latent, start, objective, decode, strategy, iterations, lr, progress,
                                     callback=callback)
    round_trip = (x0_before - latents).flatten(1).norm(dim=1) / latents.flatten(1).norm(dim=1)
    metrics = {
        **where(chain, start),
        "inversion_round_trip_error": float(round_trip.max()),  # as sdo.round_trip_error, in latent space
        "clip_similarity_before": float(1 - clip_term(before).mean()),
        "clip_similarity_after": float(1 - clip_term(after).mean()),
        "l1_to_image_before": float(Fidelity(image.float())(before).mean()),
        "l1_to_image_after": float(Fidelity(image.float())(after).mean()),
    }
    return TaskResult(before, after, result, metrics)


def style(pipe: Pipeline, clip, reference: torch.Tensor, prompt: str, *, layer: int = 3, start_t: int = 600,
          steps: int = 50, guidance_scale: float = 1.0, scheduler: str | None = None, strategy="sdo",
          iterations: int = 150, lr: float = 0.01, seed: int = 0, checkpoint_vae: bool = False,
          progress: bool = True) -> TaskResult:
    """Style-guided generation (Eq. 24): from the latent at the step nearest ``start_t`` of a generation for
    ``prompt``, minimize the Gram-matrix distance to ``reference`` on CLIP's ``layer``-th vision layer."""
    chain = task_chain(pipe, prompt, steps, guidance_scale, scheduler)
    start = step_at(chain, start_t)
    decode = VAEDecoder(pipe.vae, checkpoint=checkpoint_vae)
    objective = CLIPGramStyle(clip, reference.to(pipe.device).float(), layer=layer)
    gen = torch.Generator().manual_seed(seed)
    latent = noise_latent(pipe, chain, start, gen)
    _, before = sample_before(chain, latent, start, decode, replay(gen))
    after, result = optimize_decoded(chain, latent, start, objective, decode, strategy, iterations, lr, progress,
                                     generator=gen)
    metrics = {**where(chain, start),
               "style_loss_before": float(objective(before).mean()), "style_loss_after": float(objective(after).mean())}
    return TaskResult(before, after, result, metrics)


def aesthetic(pipe: Pipeline, clip, head: str | Path, prompt: str, *, image: torch.Tensor | None = None,
              start_t: int = 600, steps: int = 50, guidance_scale: float = 1.0, scheduler: str | None = None,
              strategy="sdo", iterations: int = 100, lr: float = 0.01, seed: int = 0, checkpoint_vae: bool = False,
              progress: bool = True) -> TaskResult:
    """Aesthetic enhancement (Eq. 25): minimize ``|a(x0) - 10|`` for a LAION-style head on CLIP, from a
    generation for ``prompt`` or from a real ``image`` inverted to the step nearest ``start_t`` (which needs a
    deterministic one-step scheduler, as :func:`edit` does)."""
    chain = task_chain(pipe, prompt, steps, guidance_scale, scheduler)
    start = step_at(chain, start_t)
    decode = VAEDecoder(pipe.vae, checkpoint=checkpoint_vae)
    scorer = AestheticScore.from_file(clip, head)
    gen = torch.Generator().manual_seed(seed)
    if image is None:
        latent = noise_latent(pipe, chain, start, gen)
    else:
        latent = _invert(chain, _encoded(pipe, decode, image.to(pipe.device)), start, "aesthetic")
    _, before = sample_before(chain, latent, start, decode, replay(gen))
    after, result = optimize_decoded(chain, latent, start, scorer, decode, strategy, iterations, lr, progress,
                                     generator=gen)
    metrics = {**where(chain, start),
               "aesthetic_before": float(scorer.score(before).mean()),
               "aesthetic_after": float(scorer.score(after).mean())}
    return TaskResult(before, after, result, metrics)


def adversarial(pipe: Pipeline, classifier, prompt: str, *, target: int | None = None, tau: float = 0.1,
                start_t: int | None = None, steps: int = 30, guidance_scale: float = 1.0,
                scheduler: str | None = None, strategy="sdo", iterations: int = 30, lr: float = 0.1,
                optimizer: str = "sgd", step_rule: str = "plain", seed: int = 0, checkpoint_vae: bool = False,
                progress: bool = True, callback=None) -> TaskResult:
    """Adversarial generation (Sec. 5.1.4): change the latent (x_T, or the one nearest ``start_t``) within an
    L-infinity ball of radius ``tau`` so that ``classifier`` no longer gives the generation its own label
    (Carlini-Wagner margin), or, with ``target``, gives it that class (cross-entropy). The defaults are the paper's:
    30 DDIM steps, 30 steps of plain gradient descent at lr 0.1, the image clamped to [-1, 1] before the classifier.
    ``step_rule="sign"`` steps on the gradient's sign (PGD, with ``optimizer="sgd"``).
    ``callback(iteration, x0, loss)``: :func:`~sdo.optimize_latent`'s (True stops early)."""
    if target is not None:  # a classifier without num_labels (any callable) is checked by its own indexing
        classes = getattr(classifier, "num_labels", None)
        check_int("target", target, minimum=0, maximum=None if classes is None else classes - 1)
    chain = task_chain(pipe, prompt, steps, guidance_scale, scheduler)
    start = 0 if start_t is None else step_at(chain, start_t)
    decode = VAEDecoder(pipe.vae, checkpoint=checkpoint_vae)
    gen = torch.Generator().manual_seed(seed)
    latent = noise_latent(pipe, chain, start, gen)
    _, before = sample_before(chain, latent, start, decode, replay(gen))
    with torch.no_grad():
        label = classifier(before.clamp(-1, 1)).argmax(-1)
    if target is None:
        objective = Clamped(ClassifierMargin(classifier, label))
    else:
        objective = Clamped(ClassifierCrossEntropy(classifier, torch.full_like(label, int(target))))
    after, result = optimize_decoded(chain, latent, start, objective, decode, strategy, iterations, lr, progress,
                                     constraint=LinfBall(tau), generator=gen, optimizer=optimizer, step_rule=step_rule,
                                     callback=callback)
    with torch.no_grad():
        label_after = classifier(after.clamp(-1, 1)).argmax(-1)
    success = label_after != label if target is None else label_after == int(target)
    metrics = {**where(chain, start), "label_before": label.tolist(),
               "label_after": label_after.tolist(), "success": success.tolist(),
               "max_abs_latent_change": float((result.latent - latent).abs().max())}
    return TaskResult(before, after, result, metrics)


def load_digit_image(path: str | Path) -> torch.Tensor:
    """An image file as a (1, 1, 16, 16) digit in [-1, 1], white ink on black as the embedded models were trained
    (grey levels averaged; a picture whose border is brighter than its middle, dark ink on paper, is negated)."""
    x = load_image(path, 16).mean(dim=1, keepdim=True)
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1).mean()
    return -x if border > x[..., 4:12, 4:12].mean() else x


def edit_digits(image: torch.Tensor, prompt: str | Sequence[str], *, lam: float = 0.5, start_t: int = 600,
                steps: int = 50, scheduler: str | None = None, strategy="sdo", iterations: int = 50, lr: float = 0.01,
                device="cpu", models=None, clip=None, progress: bool = True, callback=None) -> TaskResult:
    """Text-guided editing (Eq. 23) of digits (B, 1, 16, 16) in [-1, 1] with the embedded models, offline: the
    unconditional branch of the digits DDPM, DDIM-inverted to the step nearest ``start_t``, and the embedded
    image-text model (``sdo.embedded.load_digit_clip``); lambda = 0.5 as the paper's attribute edits.
    ``models`` (``load_digits()``) and ``clip`` (``(model, tokenizer)``) may be passed to skip loading;
    ``callback(iteration, x0, loss)``: :func:`~sdo.optimize_latent`'s (True stops early).

    Besides the CLIP score and the L1 fidelity, the metrics measure the edit on the pixels, independently of the
    model that drove it: ink mass and slant (``sdo.embedded.digit_clip.ink_statistics``) and the embedded
    classifier's label, before and after."""
    from ..embedded import load_digit_clip, load_digits
    from ..embedded.digit_clip import ink_statistics

    if image.ndim != 4 or image.shape[1:] != (1, 16, 16):
        raise UsageError(f"expected digits of shape (B, 1, 16, 16) in [-1, 1], got {tuple(image.shape)}")
    models = models or load_digits(device)
    clip_model, tokenizer = clip or load_digit_clip(device)
    image = image.to(device)
    null = torch.tensor([models.null_class], device=device)
    chain = Chain.from_diffusers(models.unet, task_scheduler(models.scheduler, scheduler), steps,
                                 cond={"class_labels": null})
    start = step_at(chain, start_t)
    latent = _invert(chain, image, start, "edit")
    clip_term = CLIPTextSimilarity(clip_model, prompt, tokenizer)
    fidelity = Fidelity(image)
    objective = WeightedSum([(1.0, clip_term), (lam, fidelity)])
    identity = lambda x: x
    before_x0, before = sample_before(chain, latent, start, identity)
    after, result = optimize_decoded(chain, latent, start, objective, identity, strategy, iterations, lr, progress,
                                     callback=callback)
    with torch.no_grad():
        labels = {name: models.classifier(x.clamp(-1, 1)).argmax(-1).tolist()
                  for name, x in (("image", image), ("before", before), ("after", after))}
    stats = {name: ink_statistics(x.cpu()) for name, x in (("image", image), ("before", before), ("after", after))}
    metrics = {
        **where(chain, start), "lambda": lam,
        "inversion_round_trip_error": float(((before_x0 - image).flatten(1).norm(dim=1)
                                             / image.flatten(1).norm(dim=1)).max()),
        "clip_similarity_before": (1 - clip_term(before)).tolist(),
        "clip_similarity_after": (1 - clip_term(after)).tolist(),
        "l1_to_image_before": fidelity(before).tolist(), "l1_to_image_after": fidelity(after).tolist(),
        **{f"ink_mass_{name}": v[0].tolist() for name, v in stats.items()},
        **{f"slant_{name}": v[1].tolist() for name, v in stats.items()},
        **{f"label_{name}": v for name, v in labels.items()},
    }
    return TaskResult(before, after, result, metrics)
