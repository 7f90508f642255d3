"""The conditioning of the backbones people tune today, built by each diffusers pipeline's own ``encode_prompt``
so that it is exactly what the pipeline feeds its denoiser:

* SDXL (``StableDiffusionXLPipeline``): both CLIP towers' penultimate hidden states, concatenated, as
  ``encoder_hidden_states``; the second tower's pooled embedding and the micro-conditions ``time_ids`` (original
  size, crop corner (0, 0), target size) in ``added_cond_kwargs``. The negative branch is zeros for an empty
  negative prompt where the pipeline's ``force_zeros_for_empty_prompt`` says so (SDXL base), as the pipeline does.
* SD3/3.5 (``StableDiffusion3Pipeline``): CLIP-L and CLIP-G hidden states padded to T5's width and joined with
  T5's along the sequence (``encoder_hidden_states``), the two pooled embeddings (``pooled_projections``); a
  pipeline saved without T5 (``text_encoder_3=None``) gets zeros in its place, as the pipeline does. Its timestep is
  the scheduler's (sigma * 1000), as :class:`~sdo.chain.Chain` passes it.
* FLUX.1 (``FluxPipeline``): T5's hidden states (``encoder_hidden_states``) and CLIP's pooled embedding
  (``pooled_projections``); a guidance-distilled transformer (dev: ``guidance_embeds``) takes ``guidance_scale`` as
  its ``guidance`` input and runs no classifier-free guidance (schnell: neither). Its transformer sees latents
  packed 2x2 into a sequence with their position ids and the timestep / 1000: :class:`FluxDenoiser` does that, so
  that sdo's chain, solvers and objectives see plain (B, 16, h, w) latents. Its schedule shifts with the image's
  token count (:func:`flow_schedule`). True classifier-free guidance, FluxPipeline's ``true_cfg_scale`` with the
  empty negative prompt, runs where the pipeline was loaded with it (``load_pipeline(..., true_cfg_scale=)``).

Classifier-free guidance runs for ``guidance_scale > 1`` on the negative branch, as in the SDXL and SD3 pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..checks import UsageError, check_prompts

__all__ = ["FAMILIES", "FluxDenoiser", "RandomBackbone", "family", "family_conditioning", "family_denoiser",
           "flow_schedule", "random_backbone"]

#: the diffusers pipeline classes conditioned here -> the family name
FAMILIES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}

_T5_TOKENS = {"sd3": 256, "flux": 512}  # the pipelines' max_sequence_length defaults


class FluxDenoiser(torch.nn.Module):
    """FLUX's transformer as a denoiser of plain latents ``(B, C, h, w)``, called as ``denoiser(x, timestep=t,
    encoder_hidden_states=..., pooled_projections=..., guidance=...)`` with the scheduler's timestep t: the latents
    are packed into FLUX's sequence of 2x2 patches ``(B, hw/4, 4C)`` with their (0, row, column) position ids, the
    text's ids are zeros, the timestep goes in as t / 1000, and the predicted velocity is unpacked again, all as
    ``FluxPipeline`` does. Its LoRA lives in the transformer (``inner``), filed under ``transformer.``; its
    ``config.patch_size`` is the 2x2 packing's."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        channels = transformer.config.in_channels // 4
        self.config = SimpleNamespace(in_channels=channels, out_channels=channels, patch_size=2,
                                      guidance_embeds=bool(transformer.config.get("guidance_embeds", False)))

    @property
    def inner(self) -> torch.nn.Module:
        """The transformer (:func:`sdo.denoiser.inner_model`): its LoRA, checkpointing and files."""
        return self.transformer

    def forward(self, sample, timestep=None, encoder_hidden_states=None, pooled_projections=None, guidance=None):
        b, c, h, w = sample.shape
        if h % 2 or w % 2:
            raise UsageError(f"FLUX packs 2x2 latent patches: the latent's height and width must be even, got {h}x{w}")
        packed = sample.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
        rows = torch.arange(h // 2, device=sample.device)[:, None].expand(h // 2, w // 2)
        columns = torch.arange(w // 2, device=sample.device)[None, :].expand(h // 2, w // 2)
        image_ids = torch.stack([torch.zeros_like(rows), rows, columns], -1).reshape(-1, 3).to(sample.dtype)
        text_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=sample.device, dtype=sample.dtype)
        out = self.transformer(hidden_states=packed, timestep=timestep.to(sample.dtype) / 1000, guidance=guidance,
                               pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                               txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def family_denoiser(name: str, denoiser: torch.nn.Module) -> torch.nn.Module:
    """The denoiser sdo's chain calls for the pipeline class ``name``: FLUX's transformer wrapped in
    :class:`FluxDenoiser`; any other as it is."""
    return FluxDenoiser(denoiser) if FAMILIES.get(name) == "flux" else denoiser


def flow_schedule(pipe, steps: int, scheduler=None) -> dict:
    """The extra ``set_timesteps`` arguments (``mu``, ``sigmas``) of a flow-matching ``scheduler`` (default: the
    pipeline's) as ``pipe``'s diffusers pipeline computes them for its image size: FLUX's sigmas
    linspace(1, 1/N, N) and, where the scheduler shifts by the image's token count (``use_dynamic_shifting``),
    ``mu`` from diffusers' ``calculate_shift``; {} for any other scheduler."""
    scheduler = pipe.scheduler if scheduler is None else scheduler
    if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
        return {}
    side = pipe.image_size // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return _flow_extras(scheduler.config, steps, pipe.denoiser, side, side)


def _flow_extras(config, steps: int, denoiser, height: int, width: int) -> dict:
    """FLUX's sigmas, and ``mu`` from the image's token count (latent side / the denoiser's patch size, squared)."""
    flux = isinstance(denoiser, FluxDenoiser)
    patch = int(getattr(denoiser.config, "patch_size", 1) or 1)
    tokens = (height // patch) * (width // patch)
    out = {}
    if flux and not config.get("use_flow_sigmas", False):
        out["sigmas"] = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]
    if config.get("use_dynamic_shifting", False):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        out["mu"] = calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                    config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                    config.get("max_shift", 1.15))
    return out


def family(pipe) -> str | None:
    """The family of a :class:`~sdo.backbones.Pipeline` conditioned here (``"sdxl"``, ``"sd3"``, ``"flux"``), or
    None."""
    return FAMILIES.get(pipe.name)


def family_conditioning(pipe, prompt: str, guidance_scale: float) -> tuple[dict, dict]:
    """``(cond, uncond)`` keyword arguments of ``pipe.denoiser`` for ``prompt`` (uncond: the empty negative
    prompt), built by the diffusers pipeline ``pipe.pipeline`` as its ``__call__`` builds them."""
    kind = family(pipe)
    prompt = check_prompts("prompt", prompt, pipe.tokenizer)[0]
    with torch.no_grad():
        if kind == "sdxl":
            return _sdxl(pipe, prompt, guidance_scale)
        if kind == "flux":
            return _flux(pipe, prompt, guidance_scale)
        return _sd3(pipe, prompt, guidance_scale)


def _sdxl(pipe, prompt: str, guidance_scale: float) -> tuple[dict, dict]:
    source = pipe.pipeline
    embeds, negative, pooled, negative_pooled = source.encode_prompt(
        prompt, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=guidance_scale > 1)
    encoder_2 = source.text_encoder_2
    projection = int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
    size = (pipe.image_size, pipe.image_size)
    time_ids = source._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                        text_encoder_projection_dim=projection).to(pipe.device)
    cond = {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    if negative is None:
        return cond, {}
    uncond = {"encoder_hidden_states": negative,
              "added_cond_kwargs": {"text_embeds": negative_pooled, "time_ids": time_ids.clone()}}
    return cond, uncond


def _sd3(pipe, prompt: str, guidance_scale: float) -> tuple[dict, dict]:
    embeds, negative, pooled, negative_pooled = pipe.pipeline.encode_prompt(
        prompt, None, None, device=pipe.device, num_images_per_prompt=1,
        do_classifier_free_guidance=guidance_scale > 1, max_sequence_length=_T5_TOKENS["sd3"])
    cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if negative is None:
        return cond, {}
    return cond, {"encoder_hidden_states": negative, "pooled_projections": negative_pooled}


def _flux(pipe, prompt: str, guidance_scale: float) -> tuple[dict, dict]:
    def encode(text: str) -> dict:
        embeds, pooled, _ = pipe.pipeline.encode_prompt(text, None, device=pipe.device, num_images_per_prompt=1,
                                                        max_sequence_length=_T5_TOKENS["flux"])
        out = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if pipe.denoiser.config.guidance_embeds:  # dev: the guidance scale is an input; schnell: no guidance at all
            out["guidance"] = torch.full([1], float(guidance_scale), device=pipe.device, dtype=torch.float32)
        return out

    true_cfg = getattr(pipe, "true_cfg_scale", None)
    return encode(prompt), (encode("") if true_cfg is not None and true_cfg > 1 else {})


@dataclass
class RandomBackbone:
    """A denoiser built from a diffusers config with random weights, as its pipeline would call it: what
    ``sdo bench --model CONFIG`` measures (real-size costs without downloading a checkpoint)."""

    denoiser: torch.nn.Module  # FLUX's transformer inside a FluxDenoiser
    scheduler: object  # the family's default scheduler
    cond: dict  # conditioning of the family's shapes (random text states, pooled embeddings, ids, guidance)
    latent_shape: tuple[int, int, int]  # (C, h, w) at the config's sample size (FLUX: 128 unless it gives one)
    description: str

    def schedule(self, steps: int) -> dict:
        """The scheduler's extra ``set_timesteps`` arguments for ``steps`` steps (FLUX's sigmas and mu)."""
        if type(self.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            return {}
        return _flow_extras(self.scheduler.config, steps, self.denoiser, *self.latent_shape[1:])


def random_backbone(config: dict, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> RandomBackbone:
    """The denoiser of a diffusers ``config`` (its ``_class_name``: UNet2DModel, UNet2DConditionModel with or without
    SDXL's ``text_time`` conditioning, SD3Transformer2DModel, FluxTransformer2DModel) with random weights from
    ``seed``, its family's scheduler and conditioning of its shapes: SD's 77 text tokens, SDXL's pooled embedding and
    time ids, SD3's 333 joint tokens and pooled projections (77 CLIP + 256 T5), FLUX's 512 T5 tokens, pooled CLIP
    and guidance 3.5. FLUX's config has no sample size: its latents are 128 x 128 (1024 px) unless the config
    gives ``sample_size``."""
    import diffusers

    config = dict(config)
    name = config.pop("_class_name", "UNet2DModel")
    if name not in ("UNet2DModel", "UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"):
        raise UsageError(f"config class {name!r} is not one sdo builds; give a UNet2DModel, UNet2DConditionModel, "
                         "SD3Transformer2DModel or FluxTransformer2DModel config")
    side = int(config.pop("sample_size", 128)) if name == "FluxTransformer2DModel" else None  # FLUX's has none
    torch.manual_seed(seed)
    model = getattr(diffusers, name).from_config(config).to(device, dtype).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    c, cond = model.config, {}
    if name == "FluxTransformer2DModel":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                              max_shift=1.15)
        cond = {"encoder_hidden_states": rand(1, 512, c.joint_attention_dim),
                "pooled_projections": rand(1, c.pooled_projection_dim)}
        if c.guidance_embeds:
            cond["guidance"] = torch.full([1], 3.5, device=device)
        return RandomBackbone(FluxDenoiser(model), scheduler, cond, (c.in_channels // 4, side, side),
                              f"{name} (random weights), FlowMatchEuler with FLUX's shift, {8 * side} px")
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    if name == "SD3Transformer2DModel":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        cond = {"encoder_hidden_states": rand(1, 333, c.joint_attention_dim),
                "pooled_projections": rand(1, c.pooled_projection_dim)}
    else:
        scheduler = diffusers.DDIMScheduler(clip_sample=False)
        if name == "UNet2DConditionModel":
            cond["encoder_hidden_states"] = rand(1, 77, c.cross_attention_dim)
            if c.addition_embed_type == "text_time":  # SDXL: pooled text and six size/crop ids
                pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
                cond["added_cond_kwargs"] = {"text_embeds": rand(1, pooled),
                                             "time_ids": torch.tensor([[8.0 * size] * 2 + [0.0] * 2 + [8.0 * size] * 2],
                                                                      device=device, dtype=dtype)}
        if c.get("num_class_embeds"):
            cond["class_labels"] = torch.zeros(1, dtype=torch.long, device=device)
    return RandomBackbone(model, scheduler, cond, (c.in_channels, size, size),
                          f"{name} (random weights), {type(scheduler).__name__}")
