
"""CLIP objectives (Sec. 5.1 of Dou et al., 2025) on a Hugging Face ``transformers`` ``CLIPModel``: text-image
similarity (Eq. 23's editing term), Gram-matrix style on a layer of the vision tower (Eq. 24) and an aesthetic
predictor on the normalized image embedding (Eq. 25).

Every one is a plain callable ``objective(x0) -> per-item loss`` on images in [-1, 1]. Preprocessing (resize,
center crop, CLIP's normalization, optional random cutouts) is written with differentiable torch operations:
no PIL, no ``no_grad``, no detaching clamp, so the gradient reaches every pixel.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..checks import UsageError, check_finite, check_prompts, reading
from .image import GramStyle

__all__ = [
    "AestheticScore",
    "CLIPGramStyle",
    "CLIPTextSimilarity",
    "ClipPreprocess",
    "clip_hidden_states",
    "encode_texts",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalization
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipPreprocess:
    """Images in [-1, 1] (B, 1 or 3, H, W) -> CLIP pixel values: grey to RGB, shorter side resized to
    ``size`` (bilinear), center crop, CLIP's mean/std. ``cutouts > 0``: that many random square crops (side
    ``min_fraction``..1 of the shorter side, from ``generator``) per image, each resized to ``size``, stacked
    along the batch (B * cutouts, 3, size, size).

    ``crop``: the image processor's own order instead (:meth:`from_processor`, what ``CLIPImageProcessor`` does to
    an image): the shorter side resized to ``size`` with the aspect ratio kept (bicubic with antialiasing, PIL's
    kernel), clipped to [0, 1] as PIL's 8-bit result is, then the center ``crop`` x ``crop``."""

    def __init__(self, size: int, mean=CLIP_MEAN, std=CLIP_STD, cutouts: int = 0, min_fraction: float = 0.5,
                 generator: torch.Generator | None = None, crop: int | None = None):
        if size < 1 or cutouts < 0 or not 0 < min_fraction <= 1 or (crop is not None and not 1 <= crop <= size):
            raise UsageError(f"need size >= 1, cutouts >= 0, 0 < min_fraction <= 1 and 1 <= crop <= size, "
                             f"got {size}, {cutouts}, {min_fraction}, {crop}")
        if crop is not None and cutouts:
            raise UsageError("cutouts are random crops of their own: give crop or cutouts, not both")
        self.size, self.cutouts, self.min_fraction, self.generator = (int(size), int(cutouts), float(min_fraction),
                                                                      generator)
        self.crop = None if crop is None else int(crop)
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def for_model(cls, model, **kwargs) -> ClipPreprocess:
        return cls(model.config.vision_config.image_size, **kwargs)

    @classmethod
    def from_processor(cls, processor) -> ClipPreprocess:
        """The preprocessing of a transformers CLIP image processor (``size={"shortest_edge": S}``,
        ``crop_size``, ``image_mean``, ``image_std``, bicubic resampling), done differentiably."""

        def read(value, *keys):
            if isinstance(value, int):
                return value
            get = value.get if hasattr(value, "get") else lambda key: getattr(value, key, None)
            return next((get(k) for k in keys if get(k)), None)

        size = read(processor.size, "shortest_edge", "height") if getattr(processor, "do_resize", True) else None
        crop = read(processor.crop_size, "height") if getattr(processor, "do_center_crop", True) else None
        resample = int(getattr(processor, "resample", 3))
        if not size or not crop or resample != 3 or not getattr(processor, "do_normalize", True):
            raise UsageError(f"{type(processor).__name__}: expected a CLIP image processor that resizes the shorter "
                             f"side (bicubic), center-crops and normalizes; got size={processor.size!r}, "
                             f"crop_size={getattr(processor, 'crop_size', None)!r}, resample={resample}")
        return cls(size, processor.image_mean, processor.image_std, crop=crop)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def _processor_order(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        short, long = sorted((h, w))
        shape = (self.size, int(self.size * long / short))  # transformers' get_resize_output_image_size
        shape = shape if h <= w else shape[::-1]
        if shape != (h, w):
            x = F.interpolate(x, size=shape, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (shape[0] - self.crop) // 2, (shape[1] - self.crop) // 2
        return x[..., top : top + self.crop, left : left + self.crop]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UsageError(f"expected images (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
        x = (images + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        side = min(h, w)
        if self.crop is not None:
            x = self._processor_order(x)
        elif self.cutouts:
            crops = []
            for _ in range(self.cutouts):
                s = max(1, int(side * (self.min_fraction
                                       + (1 - self.min_fraction) * float(torch.rand((), generator=self.generator)))))
                top = int(torch.randint(0, h - s + 1, (), generator=self.generator))
                left = int(torch.randint(0, w - s + 1, (), generator=self.generator))
                crops.append(self._resize(x[..., top : top + s, left : left + s]))
            x = torch.stack(crops, dim=1).flatten(0, 1)  # (B * cutouts, 3, size, size), cutouts of an image adjacent
        else:
            top, left = (h - side) // 2, (w - side) // 2
            x = self._resize(x[..., top : top + side, left : left + side])
        return (x - self.mean.to(x)) / self.std.to(x)


def _per_image(values: torch.Tensor, batch: int) -> torch.Tensor:
    """Average per-cutout values back to one per image."""
    return values.view(batch, -1).mean(dim=1)


def _image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model.get_image_features(pixel_values=pixel_values.to(next(model.parameters()).dtype))
    out = getattr(out, "pooler_output", out)  # transformers >= 5 returns an output object
    return F.normalize(out, dim=-1)


def encode_texts(model, tokenizer, prompts: str | Sequence[str]) -> torch.Tensor:
    """The normalized text embeddings of ``prompts`` (checked, truncated to the text tower's length), no graph."""
    config = getattr(getattr(model, "config", None), "text_config", None)
    limit = min(tokenizer.model_max_length, getattr(config, "max_position_embeddings", None) or 1 << 30)
    prompts = check_prompts("prompt", prompts, tokenizer, limit)
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(**tokens.to(next(model.parameters()).device))
    return F.normalize(getattr(out, "pooler_output", out), dim=-1)


class CLIPTextSimilarity:
    """``1 - cos(E_img(x0), E_txt(prompt))`` per image (the CLIP term of Eq. 23), averaged over cutouts.

    ``prompts`` (one, or one per image) are encoded once with ``tokenizer``; or pass ``text_embeds`` directly.
    """

    def __init__(self, model, prompts: str | Sequence[str] | None = None, tokenizer=None, *,
                 text_embeds: torch.Tensor | None = None, preprocess: ClipPreprocess | None = None):
        if (prompts is None) == (text_embeds is None):
            raise UsageError("give either prompts (with a tokenizer) or text_embeds")
        self.model = model
        self.preprocess = preprocess or ClipPreprocess.for_model(model)
        if text_embeds is None:
            if tokenizer is None:
                raise UsageError("prompts need the model's tokenizer")
            text_embeds = encode_texts(model, tokenizer, prompts)
        self.text_embeds = F.normalize(text_embeds.detach(), dim=-1)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        batch = x0.shape[0]
        pixels = self.preprocess(x0)
        embeds = _image_embeds(self.model, pixels)
        text = self.text_embeds.to(embeds)
        if text.shape[0] not in (1, batch):
            raise UsageError(f"{text.shape[0]} prompts for {batch} images: give one, or one per image")
        text = text.expand(batch, -1).repeat_interleave(embeds.shape[0] // batch, dim=0)
        return _per_image(1 - (embeds * text).sum(-1), batch)


def clip_hidden_states(model, preprocess: ClipPreprocess | None = None):
    """A ``features(x0)`` callable for :class:`~sdo.objectives.GramStyle`: the vision tower's hidden states
    (embeddings, then each encoder layer), each as (B, channels, tokens)."""
    preprocess = preprocess or ClipPreprocess.for_model(model)

    def features(x0: torch.Tensor) -> list[torch.Tensor]:
        pixels = preprocess(x0).to(next(model.parameters()).dtype)
        hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        return [h.transpose(1, 2) for h in hidden]

    return features


def CLIPGramStyle(model, reference: torch.Tensor, layer: int = 3,
                  preprocess: ClipPreprocess | None = None) -> GramStyle:
    """Eq. 24's style loss: Gram matrices of the CLIP vision tower's ``layer``-th hidden state (the paper uses
    the third), against those of the ``reference`` style image."""
    return GramStyle(clip_hidden_states(model, preprocess), reference, layers=[layer])


class AestheticScore:
    """Eq. 25: a LAION-style aesthetic predictor, ``a = head(normalized CLIP image embedding)``, shown to the
    loss clipped to [1, 10] with a straight-through clamp (the value is clipped, the gradient is not cut);
    loss ``|a - 10|`` per image. ``score(x0)`` gives the clipped score."""

    def __init__(self, model, head: nn.Module, preprocess: ClipPreprocess | None = None):
        p = next(model.parameters())
        self.model, self.head = model, head.to(p.device, p.dtype)
        self.preprocess = preprocess or ClipPreprocess.for_model(model)

    @staticmethod
    def load_head(path: str | Path) -> nn.Module:
        """A linear or MLP head from a safetensors or torch state-dict file: its Linear layers in key order
        (``weight``/``bias`` pairs), with nothing between them, as LAION's linear and "improved" MLP predictors
        are built (their dropouts are inactive at inference)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such aesthetic head file")
        with reading(path, "the aesthetic head"):
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
                raise UsageError(f"{path}: expected a state dict of tensors")
        for key, value in state.items():
            check_finite(f"{path}: {key}", value)
        weights = [k for k in state if k.endswith("weight")]
        weights.sort(key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")])
        if not weights or any(state[k].ndim != 2 for k in weights):
            raise UsageError(f"{path}: expected Linear weight matrices, found keys {sorted(state)[:6]}")
        layers = []
        for key in weights:
            w = state[key]
            linear = nn.Linear(w.shape[1], w.shape[0], bias=key[: -len("weight")] + "bias" in state)
            linear.weight.data.copy_(w)
            if linear.bias is not None:
                linear.bias.data.copy_(state[key[: -len("weight")] + "bias"])
            layers.append(linear)
        for a, b in itertools.pairwise(layers):
            if a.out_features != b.in_features:
                raise UsageError(f"{path}: layer sizes do not chain ({a.out_features} -> {b.in_features})")
        if layers[-1].out_features != 1:
            raise UsageError(f"{path}: the head must end in one output, got {layers[-1].out_features}")
        return nn.Sequential(*layers).requires_grad_(False)

    @classmethod
    def from_file(cls, model, path: str | Path, preprocess: ClipPreprocess | None = None) -> AestheticScore:
        return cls(model, cls.load_head(path), preprocess)

    def score(self, x0: torch.Tensor) -> torch.Tensor:
        batch = x0.shape[0]
        embeds = _image_embeds(self.model, self.preprocess(x0))
        raw = _per_image(self.head(embeds).squeeze(-1), batch)
        return raw + (raw.clamp(1.0, 10.0) - raw).detach()  # clipped value, unclipped gradient

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return (self.score(x0) - 10.0).abs()

