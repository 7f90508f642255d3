"""The options, task and result of :func:`sdo.finetune.finetune` (reward fine-tuning with LoRA)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .lora import DEFAULT_TARGETS

__all__ = ["STRATEGIES", "FinetuneConfig", "FinetuneResult", "FinetuneTask", "NonFiniteError"]

STRATEGIES = ("sdo", "random-truncated", "truncated", "checkpoint", "full", "shortft")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


@dataclass
class FinetuneConfig:
    output: Path  # run folder: lora/, checkpoints/, metrics.jsonl, samples/, reward.png, summary.json
    strategy: str = "sdo"  # one of STRATEGIES
    k: int = 1  # truncated: the denoiser calls kept (DRaFT-K; 1 is AlignProp-1)
    segments: int = 4  # shortft: the chain's segments, one stacked LoRA each (the paper's k = 4)
    progressive: bool = True  # shortft: train in `segments` stages (stage i trains LoRAs i..k), else stage 1 only
    steps: int = 50  # sampler steps N
    eta: float = 0.0  # DDIM's stochasticity
    guidance_scale: float | None = None  # classifier-free guidance (None: the conditional model alone)
    updates: int = 100  # optimizer updates
    batch_size: int = 8  # samples per micro-batch, over all processes (divisible by their number)
    accumulation: int = 1  # micro-batches per update
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0  # clip the global gradient norm (None: no clipping)
    lr_scheduler: str = "constant"  # diffusers.optimization.get_scheduler name (constant, cosine, linear, ...)
    warmup: int = 0  # LR warm-up updates
    rank: int = 4  # LoRA rank
    alpha: float | None = None  # LoRA alpha (None: the rank, scale 1)
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # module names (or suffixes) that get a LoRA
    base_dtype: str = "float32"  # float32 | bfloat16 | float16: the frozen base weights; the LoRA stays float32
    regularizer: float = 0.0  # DRaFT+: weight of mean ||eps_tuned - eps_base||^2 over the graph-keeping calls
    seed: int = 0  # seeds the LoRA init, the noise, the conditions and the strategy's random steps
    checkpoint_every: int = 10  # updates between checkpoints (and at the end)
    keep_checkpoints: int = 2
    sample_every: int = 10  # updates between sample grids at fixed seeds (0: none)
    sample_count: int = 16
    eval_count: int = 64  # samples scored at the end, per LoRA scale
    eval_scales: tuple[float, ...] = (0.0, 0.5, 1.0)  # LoRA scales of the final evaluation (0 = the base model)
    max_nonfinite: int = 5  # this many non-finite updates in a row stop the run
    guard_every: int = 10  # updates between hacking-guard checks on fixed seeds (sdo.guard; 0: no guard)
    guard_count: int = 64  # samples per guard check
    guard_patience: int = 2  # stop_on_hacking stops after this many failed checks in a row
    stop_on_hacking: bool = False  # stop when the guard fails (the last passing LoRA is kept either way)
    time_budget: float | None = None  # stop once the updates have taken this many seconds (equal-time comparisons)
    resume: bool = False  # continue from the last checkpoint in output/checkpoints
    tensorboard: bool = False  # also log to TensorBoard (needs the tensorboard package)
    cpu: bool = False  # stay on the CPU even when a GPU is visible
    progress: bool = True

    def __post_init__(self):
        self.output = Path(self.output)
        self.betas = tuple(float(b) for b in self.betas)
        self.target_modules = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
        self.eval_scales = tuple(float(s) for s in self.eval_scales)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if self.base_dtype not in _DTYPES:
            raise ValueError(f"base_dtype must be one of {', '.join(_DTYPES)}, got {self.base_dtype!r}")
        for name in ("k", "segments", "steps", "updates", "batch_size", "accumulation", "rank", "checkpoint_every",
                     "keep_checkpoints", "sample_count", "eval_count", "max_nonfinite", "guard_patience"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr",):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.guard_every and int(self.guard_count) < 2:
            raise ValueError(f"guard_count must be >= 2 (the guard compares sample diversity), got {self.guard_count}")
        for name in ("weight_decay", "regularizer", "eta", "warmup", "sample_every", "guard_every"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.strategy == "shortft":
            if self.segments > self.steps:
                raise ValueError(f"segments={self.segments} cannot exceed steps={self.steps}")
            if self.eta:
                raise ValueError("shortft jumps along the deterministic chain: eta must be 0")
        if self.warmup and self.lr_scheduler == "constant":  # diffusers' "constant" ignores num_warmup_steps
            raise ValueError(f"warmup={self.warmup} has no effect with lr_scheduler='constant'; use "
                             "'constant_with_warmup' (or cosine, linear, ...)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 or None, got {self.time_budget}")
        if self.output.exists() and not self.output.is_dir():
            raise ValueError(f"output {self.output} exists and is not a folder")

    @classmethod
    def from_dict(cls, values: dict) -> FinetuneConfig:
        """From a parsed config file; unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown fine-tuning option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


@dataclass
class FinetuneTask:
    """What is tuned, how its samples are made and how they are scored."""

    model: torch.nn.Module  # the denoiser the LoRA goes into (a diffusers UNet or transformer)
    scheduler: Any  # a diffusers scheduler: its config and ``steps`` make the sampler
    conditions: Sequence  # each sample's condition (prompt, class label) is drawn uniformly from here
    encode: Callable[[list], tuple[dict, dict | None]]  # conditions -> (cond, uncond) model keyword arguments
    latent_shape: tuple[int, ...]  # (channels, height, width) of one latent
    reward: Callable[[torch.Tensor, list], torch.Tensor]  # (images in [-1, 1], conditions) -> one reward each
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents -> images (a VAE); None: pixel model
    describe: Callable[[torch.Tensor, list], dict] | None = None  # extra metrics of final samples (a judge)
    caption: Callable[[torch.Tensor, list], list[str]] | None = None  # captions of sample grids
    few_step: torch.nn.Module | None = None  # shortft: the frozen few-step model, called like ``model``


@dataclass
class FinetuneResult:
    output: Path
    updates: int  # updates done (skipped ones included)
    skipped: int  # updates skipped for a non-finite loss or gradient
    seconds: float  # time spent in updates (sample grids and checkpoints excluded)
    seconds_per_update: float  # the median
    metrics: list[dict] = field(default_factory=list)  # one record per update, as in metrics.jsonl
    evaluation: dict = field(default_factory=dict)  # final samples per LoRA scale: reward and the task's metrics
    keep: Path | None = None  # the LoRA folder to keep: the final one, or the last that passed the hacking guard
    kept_update: int | None = None  # the update of that LoRA
    stopped_on_hacking: bool = False  # the run stopped at a failed guard check (stop_on_hacking)
