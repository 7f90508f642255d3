"""Fine-tuning tasks (:class:`sdo.FinetuneTask`) ready to run: the embedded digits model toward a
target class (offline, CPU, minutes), and a local text-to-image pipeline (Stable Diffusion, PixArt, LCM) on
a CLIP or aesthetic reward over a set of prompts (Sec. 5.2 of Dou et al., 2025)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backbones.conditioning import task_scheduler, text_conditioning
from ..backbones.families import flow_schedule
from ..checks import UsageError
from ..embedded.judge import DigitJudge
from ..finetuning.config import FinetuneTask
from ..objectives.rewards import digits_reward, from_objective

__all__ = ["digits_task", "pipeline_task"]


def digits_task(reward: str = "class", target: int | None = 3, labels: Sequence[int] | None = None,
                ink_weight: float = 0.1, device="cpu", models=None, judge: DigitJudge | None = None) -> FinetuneTask:
    """The embedded digits DDPM tuned on ``reward`` (``"class"``: the classifier's log-probability of ``target``;
    ``"ink"``; ``"class+ink"``). ``labels=None`` samples the unconditional model (the null class), so the tuned
    model must learn to draw ``target``; otherwise each sample's class is drawn from ``labels`` (with
    ``target=None`` the reward is each sample's own class). Final samples are read by :class:`DigitJudge`, a
    k-NN on the real digits that was not the reward. ``few_step`` is the shipped few-step student (ShortFT's
    shortcut)."""
    from ..embedded import load_digits

    models = models or load_digits(device)
    if target is not None and not 0 <= int(target) < models.num_classes:
        raise UsageError(f"target must be a digit 0-9, got {target}")
    if target is None and labels is None:
        raise UsageError("target=None rewards each sample's own class: give labels to condition on")
    conditions = [models.null_class] if labels is None else [int(c) for c in labels]
    if any(not 0 <= c <= models.null_class for c in conditions):
        raise UsageError(f"labels must be digits 0-9 (or {models.null_class}, the null class), got {list(labels)}")
    judge = judge or DigitJudge(device=device)
    unet = models.unet

    def encode(batch: list):
        device = next(unet.parameters()).device
        cond = {"class_labels": torch.tensor(batch, device=device)}
        return cond, {"class_labels": torch.full((len(batch),), models.null_class, device=device)}

    def describe(images: torch.Tensor, batch: list) -> dict:
        wanted = torch.tensor([int(target) if target is not None else c for c in batch])
        judged = judge(images).cpu()
        said = models.classifier(images.clamp(-1, 1).to(next(models.classifier.parameters()))).argmax(1).cpu()
        flat = images.detach().flatten(1).float().cpu()
        pairs = len(flat) * (len(flat) - 1)  # diversity: the mean RMS distance between two different samples
        spread = float(torch.cdist(flat, flat).sum() / pairs / flat.shape[1] ** 0.5) if pairs else 0.0
        return {"judge_target": float((judged == wanted).float().mean()),
                "judge_rejected": float((judged < 0).float().mean()),
                "classifier_target": float((said == wanted).float().mean()), "diversity": spread}

    def caption(images: torch.Tensor, batch: list) -> list[str]:
        judged = judge(images).cpu().tolist()
        return ["no digit" if j < 0 else f"judge {j}" for j in judged]

    def data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, list]:
        """``n`` training digits drawn uniformly, conditioned as the task's samples are (their own class when the
        task draws labels; the null class when it samples unconditionally): ReFL's pre-training data."""
        index = torch.randint(len(train_labels), (n,), generator=generator)
        own = [int(c) for c in train_labels[index]]
        return train_images[index], own if labels is not None else [models.null_class] * n

    from ..embedded import load_digits_student
    from ..embedded.digits import load_dataset

    train_images, train_labels = load_dataset("train")
    return FinetuneTask(unet, models.scheduler, conditions, encode, (1, models.image_size, models.image_size),
                        digits_reward(reward, models.classifier, target, ink_weight), describe=describe,
                        caption=caption, few_step=load_digits_student(device), data=data)


def _stack(parts: list):
    """Concatenate per-prompt conditioning (dicts of batch-1 tensors) along the batch."""
    first = parts[0]
    if torch.is_tensor(first):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _stack([p[k] for p in parts]) for k in first}
    return first


def pipeline_task(pipe, prompts: Sequence[str], reward, guidance_scale: float = 7.5, scheduler: str | None = None,
                  vae_checkpoint: bool = True, few_step=None, vae_slicing: bool = False,
                  judge=None) -> FinetuneTask:
    """A text-to-image pipeline (:func:`sdo.backbones.load_pipeline`) tuned over ``prompts`` on ``reward``: a
    ``reward(images, prompts)`` callable, or an objective ``objective(images)`` (a loss, e.g.
    :class:`sdo.objectives.clip.AestheticScore`) wrapped by passing ``("objective", objective)``. Images are decoded by
    the VAE inside the graph (checkpointed). ``scheduler``: see :func:`sdo.backbones.task_scheduler` (default:
    the pipeline's own where sdo supports it, else DDIM). ``guidance_scale`` conditions the prompts (an
    LCM-distilled UNet embeds it); give the same value to :class:`FinetuneConfig`, which runs the guidance.
    ``few_step``: ShortFT's frozen few-step model, called like the pipeline's denoiser (e.g. its UNet with a
    Hyper-SD/TCD/PCM LoRA fused in). ``vae_slicing``: decode one image at a time, each checkpointed (1024 px
    batches). ``judge``: a second ``reward(images, prompts)`` that was not the reward (e.g. CLIP score beside
    PickScore), read on the final samples as ``judge_reward``, so that a reward climbing alone shows."""
    from ..backbones.vae import VAEDecoder

    if getattr(pipe, "true_cfg_scale", None) is not None:
        raise UsageError("true_cfg_scale is for the latent tasks; fine-tuning runs classifier-free guidance with "
                         "FinetuneConfig.guidance_scale (FLUX.1-dev: its embedded guidance input)", "true_cfg_scale")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UsageError("give at least one non-empty prompt")
    if isinstance(reward, tuple) and reward[0] == "objective":
        reward = from_objective(reward[1])
    cache: dict[str, dict] = {}

    def encode(batch: list):
        for p in batch:
            if p not in cache:
                cache[p] = text_conditioning(pipe, p, guidance_scale)
        parts = [cache[p] for p in batch]
        cond = _stack([c["cond"] for c in parts])
        uncond = _stack([c["uncond"] for c in parts]) if "uncond" in parts[0] else None
        return cond, uncond

    channels = pipe.denoiser.config.in_channels
    side = pipe.image_size // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    chosen = task_scheduler(pipe.scheduler, scheduler)

    def describe(images: torch.Tensor, batch: list) -> dict:
        with torch.no_grad():
            return {"judge_reward": float(judge(images, list(batch)).float().mean())}

    return FinetuneTask(pipe.denoiser, chosen, prompts, encode, (channels, side, side), reward,
                        describe=describe if judge is not None else None,
                        decode=VAEDecoder(pipe.vae, checkpoint=vae_checkpoint, slicing=vae_slicing), few_step=few_step,
                        schedule=lambda steps: flow_schedule(pipe, steps, chosen))
