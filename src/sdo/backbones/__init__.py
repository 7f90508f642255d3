"""Backbones: loading a local diffusers pipeline and the files the tasks read (:mod:`~sdo.backbones.pipeline`),
conditioning each family's denoiser on a prompt as its diffusers pipeline does (:mod:`~sdo.backbones.conditioning`),
and the VAE and text encoders (:mod:`~sdo.backbones.vae`). A new backbone family is one entry in
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
from .vae import VAEDecoder, decoded

__all__ = [
    "SCHEDULERS",
    "ImageClassifier",
    "Pipeline",
    "VAEDecoder",
    "decoded",
    "encode_prompts",
    "guidance_scale_embedding",
    "is_lcm_distilled",
    "is_pixart",
    "load_clip",
    "load_denoiser",
    "load_image",
    "load_pipeline",
    "task_scheduler",
    "text_conditioning",
]
