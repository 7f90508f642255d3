"""Local diffusers pipelines and the other folders and files the paper's tasks read: a text-to-image pipeline
(:class:`Pipeline`), a CLIP model and its tokenizer, an image, a transformers image classifier. Offline: a hub id is
loaded only when the caller says so. Every error from a user's folder or file names it (:func:`sdo.checks.reading`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checks import UsageError, check_device, check_half_on_cpu, check_number, reading
from ..denoiser import inner_model
from .families import family_denoiser

__all__ = ["ImageClassifier", "Pipeline", "load_clip", "load_denoiser", "load_image", "load_pipeline"]


@dataclass
class Pipeline:
    """The parts of a text-to-image latent diffusion pipeline the tasks use."""

    denoiser: torch.nn.Module  # UNet2DConditionModel or a transformer (PixArt)
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    image_size: int  # pixels
    name: str = ""  # the diffusers pipeline class (PixArt-alpha and -sigma differ in prompt length)
    pipeline: object = None  # the diffusers pipeline itself: SDXL, SD3 and FLUX are conditioned by its encode_prompt
    true_cfg_scale: float | None = None  # FLUX: true classifier-free guidance on the empty prompt (None: off)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device


def load_pipeline(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32,
                  allow_hub: bool = False, true_cfg_scale: float | None = None, drop_t5: bool = False) -> Pipeline:
    """A local diffusers pipeline folder (``model_index.json`` with unet or transformer, vae, text_encoder,
    tokenizer, scheduler), offline; a hub id only with ``allow_hub=True``. The frozen parts are cast to
    ``dtype``; everything is frozen (the tasks optimize latents). ``true_cfg_scale``: FLUX only, FluxPipeline's
    ``true_cfg_scale`` with the empty negative prompt (a second, unconditional branch beside dev's embedded
    guidance; None or 1: off). ``drop_t5``: SD3 only, load it without its T5 (``text_encoder_3=None``, as its pipeline
    allows: zeros in T5's place; 8.9 GiB less in bfloat16), also a folder saved that way."""
    from diffusers import DiffusionPipeline

    device = check_device("device", device)
    if true_cfg_scale is not None:
        true_cfg_scale = check_number("true_cfg_scale", true_cfg_scale, above=0)
    check_half_on_cpu("dtype", dtype, device)
    local = Path(path).is_dir()
    if not local and not allow_hub:
        raise FileNotFoundError(
            f"{path}: no such pipeline folder (a folder with model_index.json); sdo does not download models unless "
            "you pass a hub id with allow_hub=True"
        )
    if local and not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} has no model_index.json: not a diffusers pipeline folder")
    name = None
    if (true_cfg_scale is not None or drop_t5) and local:  # before loading anything
        with reading(Path(path) / "model_index.json", "the pipeline's index"):
            name = json.loads((Path(path) / "model_index.json").read_text()).get("_class_name")
    if true_cfg_scale is not None and name not in (None, "FluxPipeline"):
        raise UsageError(f"true_cfg_scale is FLUX's; {name} runs classifier-free guidance with guidance_scale",
                         "true_cfg_scale")
    if drop_t5 and name not in (None, "StableDiffusion3Pipeline"):
        raise UsageError(f"drop_t5 is SD3's (its optional T5); {name} is not an SD3 pipeline", "drop_t5")
    parts = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}
    with warnings.catch_warnings():  # newer diffusers call it `dtype`; `torch_dtype` works in every version >= 0.30
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        with reading(path, "the diffusers pipeline"):
            pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=not allow_hub,
                                                     **parts)
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    missing = [name for name, part in (("unet/transformer", denoiser), ("vae", getattr(pipe, "vae", None)),
                                       ("text_encoder", getattr(pipe, "text_encoder", None)),
                                       ("tokenizer", getattr(pipe, "tokenizer", None))) if part is None]
    if missing:
        raise UsageError(f"{path}: the pipeline lacks {', '.join(missing)}")
    for module in (denoiser, *(getattr(pipe, n, None) for n in ("vae", "text_encoder", "text_encoder_2",
                                                                  "text_encoder_3"))):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in float16: the pipelines' force_upcast rule
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = getattr(denoiser.config, "sample_size", None) or getattr(pipe, "default_sample_size", None)
    size = size if isinstance(size, int) else size[0]
    denoiser = family_denoiser(type(pipe).__name__, denoiser)
    return Pipeline(denoiser, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, size * factor,
                    type(pipe).__name__, pipe, true_cfg_scale)


def load_denoiser(pipe: Pipeline, folder: str | Path) -> torch.nn.Module:
    """A diffusers model folder of the same class as ``pipe``'s denoiser (ShortFT's few-step model: the pipeline's
    UNet or transformer with e.g. a Hyper-SD LoRA fused in and saved), frozen, on ``pipe``'s device and dtype, and
    wrapped as the family's chain calls it (FLUX: :class:`~sdo.backbones.families.FluxDenoiser`)."""
    inner = inner_model(pipe.denoiser)
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder (a diffusers {type(inner).__name__} folder)")
    parameter = next(inner.parameters())
    with reading(folder, f"the {type(inner).__name__}"):
        model = type(inner).from_pretrained(str(folder), local_files_only=True)
    model = model.to(parameter.device, parameter.dtype).eval().requires_grad_(False)
    return family_denoiser(pipe.name, model)


def load_clip(path: str | Path, device="cpu", tokenizer: bool = True) -> tuple:
    """``(model, tokenizer or None)``: a local transformers CLIPModel folder (and its tokenizer), frozen, offline."""
    from transformers import CLIPModel, CLIPTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such CLIP model folder")
    with reading(path, "the CLIP model"):
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True) if tokenizer else None
    return model.to(check_device("device", device)).eval().requires_grad_(False), tok


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file as a (1, 3, size, size) tensor in [-1, 1] (center-cropped to a square, resized)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image")
    with reading(path, "the image"):
        img = Image.open(path).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return (x / 127.5 - 1)[None]


class ImageClassifier:
    """A transformers image classifier (``AutoModelForImageClassification``) on images in [-1, 1]: bilinear
    resize to its input size and its own mean/std, differentiably; ``classifier(images) -> logits``."""

    def __init__(self, model, size: int, mean: Sequence[float], std: Sequence[float]):
        self.model, self.size = model.eval().requires_grad_(False), int(size)
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    @classmethod
    def from_folder(cls, path: str | Path, device="cpu") -> ImageClassifier:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such image classifier folder")
        with reading(path, "the image classifier"):
            model = AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True).to(device)
            processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        size = processor.size  # an int, a dict or (transformers >= 5) a SizeDict
        if not isinstance(size, int):
            get = size.get if hasattr(size, "get") else lambda key: getattr(size, key, None)
            size = get("height") or get("shortest_edge")
        if not size:
            raise UsageError(f"{path}: cannot read the classifier's input size from {processor.size!r}")
        return cls(model, size, processor.image_mean, processor.image_std)

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate((images + 1) / 2, size=(self.size, self.size), mode="bilinear",
                                            align_corners=False)
        x = (x - self.mean.to(x)) / self.std.to(x)
        return self.model(pixel_values=x.to(next(self.model.parameters()).dtype)).logits.float()
