"""Backbones: loading a local diffusers pipeline and the files the tasks read (:mod:`~sdo.backbones.pipeline`),
conditioning each family's denoiser on a prompt as its diffusers pipeline does (:mod:`~sdo.backbones.conditioning`),
the VAE and text encoders (:mod:`~sdo.backbones.vae`), and the preference rewards' models
(:mod:`~sdo.backbones.rewards`). A new backbone family is one entry in
:func:`~sdo.backbones.conditioning.text_conditioning` (or a new file here that it calls)."""

from .conditioning import (
    SCHEDULERS,
    encode_prompts,
    guidance_scale_embedding,
    is_lcm_distilled,
    is_pixart,
    task_scheduler,
    text_conditioning,
)
from .pipeline import ImageClassifier, Pipeline, load_clip, load_denoiser, load_image, load_pipeline
from .rewards import check_reward, load_clip_reward_parts, load_reward
from .vae import VAEDecoder, decoded

__all__ = [
    "SCHEDULERS",
    "ImageClassifier",
    "Pipeline",
    "VAEDecoder",
    "check_reward",
    "decoded",
    "encode_prompts",
    "guidance_scale_embedding",
    "is_lcm_distilled",
    "is_pixart",
    "load_clip",
    "load_clip_reward_parts",
    "load_denoiser",
    "load_image",
    "load_pipeline",
    "load_reward",
    "task_scheduler",
    "text_conditioning",
]
