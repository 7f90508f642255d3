"""What the latent tasks (:mod:`sdo.recipes.latent_tasks`) need to know about a pipeline's backbone and scheduler,
and prompt encoding: ``cond, uncond = sdo.encode_prompts(text_encoder, tokenizer, ["a red car"])``.

Text conditioning differs by backbone:

* Stable Diffusion 1.x/2.x (``UNet2DConditionModel``): CLIP's hidden states of the padded prompt, classifier-free
  guidance on the empty prompt.
* PixArt-alpha/sigma (``PixArtTransformer2DModel``): T5's hidden states *and* the attention mask of the prompt
  (120 tokens for alpha, 300 for sigma), plus the micro-conditions ``added_cond_kwargs`` (resolution and aspect
  ratio, where the transformer uses them); guidance as SD's.
* An LCM-distilled UNet (``time_cond_proj_dim`` in its config): guidance is embedded, not run. The UNet takes the
  guidance weight ``w = guidance_scale - 1`` as ``timestep_cond``, and there is no unconditional branch.
* SDXL, SD3/3.5 and FLUX.1: built by their pipelines' own ``encode_prompt`` (:mod:`sdo.backbones.families`).

The tasks sample with the pipeline's scheduler when sdo supports it, or with one chosen by name
(:data:`SCHEDULERS`), built from the pipeline scheduler's config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..checks import UsageError, check_prompts
from ..solvers import SUPPORTED_SCHEDULERS
from .families import family, family_conditioning

__all__ = [
    "SCHEDULERS",
    "encode_prompts",
    "guidance_scale_embedding",
    "is_lcm_distilled",
    "is_pixart",
    "task_scheduler",
    "text_conditioning",
]

#: scheduler names the tasks and the ``--scheduler`` option accept
SCHEDULERS = ("ddim", "dpm-solver++", "lcm", "euler")

# pipeline class -> prompt tokens (diffusers' max_sequence_length default of each PixArt pipeline)
_PIXART_TEXT_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


def task_scheduler(scheduler, name: str | None = None):
    """The scheduler a task samples with.

    ``name=None``: ``scheduler`` itself if sdo supports it (DDIM, DPM-Solver++, LCM, Euler, ...), else DDIM from
    its config (Stable Diffusion's default PNDM), as the paper samples. A name from :data:`SCHEDULERS`: that
    diffusers scheduler built from ``scheduler``'s config (its betas, prediction type, timestep spacing), with
    ``clip_sample`` off where the scheduler has it (clipping zeroes gradients); "dpm-solver++" is the multistep
    solver of the config's order (2 unless it says 1).
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler

    if name is None:
        if type(scheduler).__name__ in SUPPORTED_SCHEDULERS:
            return scheduler
        name = "ddim"
    builders = {
        "ddim": lambda config: DDIMScheduler.from_config(config, clip_sample=False),
        "dpm-solver++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
        "lcm": lambda config: LCMScheduler.from_config(config, clip_sample=False),
        "euler": lambda config: EulerDiscreteScheduler.from_config(config),
    }
    if name not in builders:
        raise UsageError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)} (or None: the pipeline's)")
    return builders[name](scheduler.config)


def guidance_scale_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sinusoidal embedding, shape ``(len(w), dim)``, of guidance weights ``w`` (1-D) that an LCM-distilled
    UNet takes as ``timestep_cond``. This is diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``
    (after VDM's timestep embedding), written out because diffusers has it only as a pipeline method."""
    if w.ndim != 1:
        raise UsageError(f"w must be 1-D, got shape {tuple(w.shape)}")
    w = w * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
    emb = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 == 1 else emb


def is_pixart(denoiser) -> bool:
    """Whether ``denoiser`` is a PixArt transformer (T5 conditioning with an attention mask)."""
    from diffusers import PixArtTransformer2DModel

    return isinstance(denoiser, PixArtTransformer2DModel)


def is_lcm_distilled(denoiser) -> bool:
    """Whether ``denoiser`` embeds the guidance scale (an LCM-distilled UNet: ``time_cond_proj_dim`` set)."""
    return getattr(getattr(denoiser, "config", None), "time_cond_proj_dim", None) is not None


def text_conditioning(pipe, prompt: str, guidance_scale: float) -> dict:
    """``Chain.from_diffusers`` keyword arguments (``cond``, and ``uncond`` with ``guidance_scale`` when
    classifier-free guidance runs) for ``prompt`` on ``pipe``, a :class:`sdo.backbones.Pipeline`, as its diffusers
    pipeline conditions its backbone (see the module's docstring). ``guidance_scale == 1`` runs no guidance; an
    LCM-distilled UNet never runs it, it embeds ``guidance_scale - 1``."""
    denoiser, tokenizer = pipe.denoiser, pipe.tokenizer
    param = next(denoiser.parameters())
    if family(pipe) is not None:  # SDXL, SD3: CFG for guidance_scale > 1; FLUX: true CFG at pipe.true_cfg_scale
        cond, uncond = family_conditioning(pipe, prompt, guidance_scale)
        scale = pipe.true_cfg_scale if family(pipe) == "flux" else guidance_scale
        return {"cond": cond, "uncond": uncond, "guidance_scale": scale} if uncond else {"cond": cond}
    if is_pixart(denoiser):
        length = min(_PIXART_TEXT_LENGTH.get(pipe.name, 120), tokenizer.model_max_length)
        cond, uncond = encode_prompts(pipe.text_encoder, tokenizer, [prompt], max_length=length,
                                      attention_mask_key="encoder_attention_mask")
        micro = {"resolution": None, "aspect_ratio": None}
        if getattr(denoiser, "use_additional_conditions", False):  # PixArt-alpha 1024px: (height, width), h / w
            micro = {"resolution": torch.tensor([[float(pipe.image_size)] * 2], device=param.device, dtype=param.dtype),
                     "aspect_ratio": torch.tensor([[1.0]], device=param.device, dtype=param.dtype)}
        cond["added_cond_kwargs"], uncond["added_cond_kwargs"] = micro, dict(micro)
    else:
        cond, uncond = encode_prompts(pipe.text_encoder, tokenizer, [prompt])
    if is_lcm_distilled(denoiser):
        w = torch.tensor([float(guidance_scale) - 1.0])
        embedding = guidance_scale_embedding(w, denoiser.config.time_cond_proj_dim)
        return {"cond": {**cond, "timestep_cond": embedding.to(param.device, param.dtype)}}
    if guidance_scale == 1:
        return {"cond": cond}
    return {"cond": cond, "uncond": uncond, "guidance_scale": guidance_scale}


def encode_prompts(text_encoder, tokenizer, prompts: str | Sequence[str], negative: str | Sequence[str] = "",
                   key: str = "encoder_hidden_states", *, max_length: int | None = None,
                   attention_mask_key: str | None = None) -> tuple[dict, dict]:
    """``(cond, uncond)`` keyword arguments for a text-conditioned denoiser: the text encoder's last hidden state
    of the prompts and of the negative prompts (the empty prompt by default) under ``key``, each padded to
    ``max_length`` tokens (default: the tokenizer's ``model_max_length``) as diffusers pipelines do. Pass them to
    ``Chain.from_diffusers(..., cond=cond, uncond=uncond, guidance_scale=7.5)``.

    By default this is Stable Diffusion's conditioning: CLIP sees the padded tokens without an attention mask.
    With ``attention_mask_key`` (PixArt's ``"encoder_attention_mask"``) the tokenizer's attention mask goes to
    the text encoder (T5 must not attend to padding) and into both dicts under that key, as PixArt pipelines
    pass it to their transformer (with ``max_length=120`` for PixArt-alpha).
    """
    positions = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None) or 1 << 30
    length = min(tokenizer.model_max_length, positions) if max_length is None else int(max_length)
    prompts = check_prompts("prompt", prompts, tokenizer, length)
    negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if len(negative) != len(prompts):
        raise UsageError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
    if any(n.strip() for n in negative):  # empty ones are the default: only the length of the others is checked
        check_prompts("negative prompt", [n for n in negative if n.strip()], tokenizer, length)
    device = next(text_encoder.parameters()).device

    def encode(texts) -> dict:
        tokens = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        ids = tokens.input_ids.to(device)
        with torch.no_grad():
            if attention_mask_key is None:
                return {key: text_encoder(ids)[0]}
            mask = tokens.attention_mask.to(device)
            return {key: text_encoder(ids, attention_mask=mask)[0], attention_mask_key: mask}

    return encode(prompts), encode(negative)
