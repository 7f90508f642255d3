"""The embedded digits models, and the code that trains them.

Data: scikit-learn's bundled digits (1,797 images, 8x8, values 0..16), upsampled bilinearly to 16x16 and
scaled to [-1, 1]; a fixed held-out split of 297 images. Models:

- a class-conditional pixel DDPM: diffusers ``UNet2DModel`` with a class embedding (10 digits plus a null
  class for classifier-free guidance, used for 10% of training labels), epsilon prediction, 1000 training
  timesteps, EMA weights (Ho et al., 2020);
- a small CNN classifier (the "audit filter" of the adversarial task, the feature extractor of the style task
  and a reward for fine-tuning).

``python -m sdo train digits`` (or ``sdo train digits``) retrains both, deterministically given ``--seed``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checks import UsageError

__all__ = [
    "IMAGE_SIZE",
    "NULL_CLASS",
    "NUM_CLASSES",
    "DigitClassifier",
    "TrainConfig",
    "evaluate_samples",
    "load_dataset",
    "scheduler_config",
    "train_classifier",
    "train_digits",
    "train_unet",
    "unet_config",
]

IMAGE_SIZE = 16
NUM_CLASSES = 10
NULL_CLASS = 10  # the unconditional label (classifier-free guidance)
HELD_OUT = 297


def load_dataset(split: str = "train", seed: int = 0):
    """(images, labels): images in [-1, 1], shape (n, 1, 16, 16), float32; split "train", "test" or "all".
    The split is a fixed permutation of the 1,797 images (``seed``), the last 297 held out."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise UsageError(f"split must be 'train', 'test' or 'all', got {split!r}")
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = (images * 2 - 1).clamp(-1, 1)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    if split == "train":
        order = order[:-HELD_OUT]
    elif split == "test":
        order = order[-HELD_OUT:]
    return images[order], labels[order]


class DigitClassifier(nn.Module):
    """Three 3x3 conv layers (16x16 -> 8x8 -> 4x4) and a linear head; images in [-1, 1] -> 10 logits."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(1, width, 3, padding=1),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            ]
        )
        self.head = nn.Linear(2 * width * 16, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activations of each conv layer (for Gram-matrix style losses)."""
        out = []
        for conv in self.convs:
            x = F.silu(conv(x))
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[-1].flatten(1))


def unet_config() -> dict:
    """The DDPM's UNet2DModel config (0.65M parameters; attention at the 8x8 level and in the mid block)."""
    return {
        "sample_size": IMAGE_SIZE,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (16, 32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": 8,
        "norm_num_groups": 8,
        "num_class_embeds": NUM_CLASSES + 1,
    }


def scheduler_config() -> dict:
    """Noise schedule of the DDPM (1000 steps, cosine, epsilon prediction); load with any supported scheduler."""
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "clip_sample": False,
    }


@dataclass
class TrainConfig:
    seed: int = 0  # seeds the data split, the weights, the batches and the noise
    classifier_epochs: int = 30  # passes over the training split
    classifier_lr: float = 2e-3  # AdamW
    unet_steps: int = 3000  # optimizer steps of the DDPM
    unet_batch: int = 64  # DDPM batch size
    unet_lr: float = 2e-3  # AdamW, cosine decay to zero after a 200-step warm-up
    ema_decay: float = 0.999  # EMA of the DDPM weights (the shipped weights), with warm-up 1 - (1 + step)^(-2/3)
    label_dropout: float = 0.1  # fraction of training labels replaced by the null class
    eval_samples: int = 1000  # class-conditional samples for the model card's quality figure
    eval_steps: int = 50  # DDIM steps of those samples


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (edge padding), for the classifier's robustness."""
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]


def train_classifier(cfg: TrainConfig, progress: bool = True):
    """Train the classifier on the training split; returns (model, {"test_accuracy": ...})."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    images, labels = load_dataset("train", cfg.seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.classifier_lr, weight_decay=1e-4)
    bar = tqdm(range(cfg.classifier_epochs), desc="classifier", disable=not progress)
    for _ in bar:
        for idx in torch.randperm(len(labels), generator=gen).split(64):
            x = _shift(images[idx], gen) + 0.05 * torch.randn(images[idx].shape, generator=gen)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    test_images, test_labels = load_dataset("test", cfg.seed)
    with torch.no_grad():
        accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
    return model, {"test_accuracy": accuracy, "test_images": len(test_labels)}


def ema_step(model, loss, opt, sched, ema, losses: list, bar) -> None:
    """One optimizer step of a shipped model's training: backward, clip the gradient norm at 1, step the optimizer,
    its LR schedule and the EMA of the weights; log the loss (its mean over 50 steps on the progress bar)."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    ema.step(model.parameters())
    losses.append(loss.item())
    if len(losses) % 50 == 0:
        bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.5f}")


def train_unet(cfg: TrainConfig, progress: bool = True):
    """Train the class-conditional DDPM (epsilon loss, Ho et al. Algorithm 1); returns (EMA model, metrics)."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    images, labels = load_dataset("train", cfg.seed)
    model = UNet2DModel(**unet_config())
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
    noise_schedule = DDPMScheduler(**scheduler_config())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.unet_lr, weight_decay=1e-4)
    warmup = 200
    lr_at = lambda step: (min(1.0, (step + 1) / warmup) * 0.5
                          * (1 + torch.cos(torch.tensor(step / cfg.unet_steps * torch.pi)).item()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses = []
    bar = tqdm(range(cfg.unet_steps), desc="ddpm", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, len(labels), (cfg.unet_batch,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < cfg.label_dropout] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(y),), generator=gen)
        loss = F.mse_loss(model(noise_schedule.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        ema_step(model, loss, opt, sched, ema, losses, bar)
    ema.copy_to(model.parameters())
    model.eval().requires_grad_(False)
    return model, {"final_loss_mean_last_500": sum(losses[-500:]) / len(losses[-500:])}


def evaluate_samples(unet, scheduler, classifier, n: int = 1000, steps: int = 50, seed: int = 0, batch: int = 250,
                     progress: bool = True):
    """Class-conditional samples (DDIM, ``steps``), n/10 per class: the fraction the classifier assigns to their
    class with probability > 0.9, and its plain accuracy on them."""
    from ..chain import Chain
    from ..sampling import sample

    labels = torch.arange(n) % NUM_CLASSES
    gen = torch.Generator().manual_seed(seed)
    confident = correct = 0
    with torch.no_grad():
        for idx in tqdm(labels.split(batch), desc="evaluate", disable=not progress):
            chain = Chain.from_diffusers(unet, scheduler, steps, cond={"class_labels": idx})
            x = torch.randn(len(idx), 1, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
            probs = classifier(sample(chain, x).clamp(-1, 1)).softmax(-1)
            p_true = probs[torch.arange(len(idx)), idx]
            confident += (p_true > 0.9).sum().item()
            correct += (probs.argmax(-1) == idx).sum().item()
    return {"samples": n, "ddim_steps": steps, "confident_correct": confident / n, "accuracy": correct / n}


def train_digits(output: str | Path, cfg: TrainConfig | None = None, progress: bool = True) -> dict:
    """Train both models, write ``digits_unet.safetensors``, ``digits_classifier.safetensors``,
    ``digits_scheduler.json`` and ``digits_card.json`` (the measured figures) into ``output``."""
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    cfg = cfg or TrainConfig()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    classifier, cls_metrics = train_classifier(cfg, progress)
    cls_seconds = time.perf_counter() - began
    unet, unet_metrics = train_unet(cfg, progress)
    unet_seconds = time.perf_counter() - began - cls_seconds
    scheduler = DDIMScheduler(**scheduler_config())
    quality = evaluate_samples(unet, scheduler, classifier, cfg.eval_samples, cfg.eval_steps, cfg.seed,
                               progress=progress)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, output / "digits_unet.safetensors")
    save_file(classifier.state_dict(), output / "digits_classifier.safetensors")
    (output / "digits_scheduler.json").write_text(json.dumps(scheduler_config(), indent=2) + "\n")
    card = {
        "config": asdict(cfg),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "classifier_parameters": sum(p.numel() for p in classifier.parameters()),
        "classifier": cls_metrics,
        "unet": unet_metrics,
        "samples": quality,
        "seconds": {"classifier": cls_seconds, "unet": unet_seconds, "total": time.perf_counter() - began},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (output / "digits_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
