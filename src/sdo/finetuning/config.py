"""The options, task and result of :func:`sdo.finetune.finetune` (reward fine-tuning with LoRA)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..checks import UsageError, check_choice, check_half_on_cpu, check_int, check_number, check_text
from ..gradients import available_strategies
from ..solvers import Solver, solver_from_scheduler
from .lora import DEFAULT_TARGETS

__all__ = ["BASE_DTYPES", "FinetuneConfig", "FinetuneResult", "FinetuneTask", "methods"]

BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_POSITIVE_INTS = ("k", "segments", "steps", "updates", "batch_size", "accumulation", "rank", "checkpoint_every",
                  "keep_checkpoints", "sample_count", "eval_count", "max_nonfinite", "guard_patience")


def methods() -> tuple[str, ...]:
    """What :attr:`FinetuneConfig.strategy` accepts: every registered gradient method that trains weights
    (:func:`sdo.gradients.available_strategies`), and ``"shortft"`` (:mod:`sdo.finetuning.shortft`)."""
    return (*available_strategies(for_weights=True), "shortft")


def _lr_schedulers() -> tuple[str, ...]:
    from diffusers.optimization import SchedulerType

    return tuple(kind.value for kind in SchedulerType)


def _sequence(name: str, value) -> tuple:
    """A list or tuple field (a single string stands for one item)."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise UsageError(f"{name} must be a list, got {type(value).__name__} {value!r}", name)
    return tuple(value)


@dataclass
class FinetuneConfig:
    output: Path  # run folder: lora/, checkpoints/, metrics.jsonl, samples/, reward.png, summary.json
    strategy: str = "sdo"  # one of methods(): a gradient method that trains weights, or "shortft"
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
    block_checkpointing: bool = False  # the denoiser's own checkpointing inside its blocks (memory at SDXL/FLUX size)
    regularizer: float = 0.0  # DRaFT+: weight of mean ||eps_tuned - eps_base||^2 over the graph-keeping calls
    pretrain_weight: float = 0.0  # ReFL: weight of the diffusion loss on the task's data beside the reward (0: off)
    seed: int = 0  # seeds the LoRA init, the noise, the conditions and the strategy's random steps
    checkpoint_every: int = 10  # updates between checkpoints (and at the end)
    keep_checkpoints: int = 2
    sample_every: int = 10  # updates between sample grids at fixed seeds (0: none)
    sample_count: int = 16
    eval_count: int = 64  # samples scored at the end, per LoRA scale
    eval_scales: tuple[float, ...] = (0.0, 0.5, 1.0)  # LoRA scales of the final evaluation (0 = the base model)
    max_nonfinite: int = 5  # this many non-finite updates in a row stop the run
    guard_every: int = 10  # updates between hacking-guard checks on fixed seeds (sdo.finetuning.guard; 0: no guard)
    guard_count: int = 64  # samples per guard check
    guard_patience: int = 2  # stop_on_hacking stops after this many failed checks in a row
    stop_on_hacking: bool = False  # stop when the guard fails (the last passing LoRA is kept either way)
    time_budget: float | None = None  # stop once the updates have taken this many seconds (equal-time comparisons)
    resume: bool = False  # continue from the last checkpoint in output/checkpoints
    tensorboard: bool = False  # also log to TensorBoard (needs the tensorboard package)
    cpu: bool = False  # stay on the CPU even when a GPU is visible
    progress: bool = True

    def __post_init__(self):
        """Every field checked for type, finiteness and range (a :class:`~sdo.UsageError` naming it)."""
        if not isinstance(self.output, (str, os.PathLike)) or not str(self.output).strip():
            raise UsageError(f"output must be a folder path, got {self.output!r}", "output")
        self.output = Path(self.output)
        check_choice("strategy", self.strategy, methods())
        check_choice("base_dtype", self.base_dtype, BASE_DTYPES)
        check_choice("lr_scheduler", self.lr_scheduler, _lr_schedulers())
        for name in _POSITIVE_INTS:
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        for name in ("warmup", "sample_every", "guard_every", "seed"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=0))
        self.guard_count = check_int("guard_count", self.guard_count, minimum=2 if self.guard_every else 1)
        self.lr = check_number("lr", self.lr, above=0, maximum=1e6)  # beyond, AdamW's float32 arithmetic overflows
        self.eta = check_number("eta", self.eta, minimum=0, maximum=1)  # DDIM's sigma_t needs eta <= 1
        for name in ("weight_decay", "regularizer", "pretrain_weight"):
            setattr(self, name, check_number(name, getattr(self, name), minimum=0))
        if self.guidance_scale is not None:
            self.guidance_scale = check_number("guidance_scale", self.guidance_scale, minimum=0)
        for name in ("max_grad_norm", "alpha", "time_budget"):
            if getattr(self, name) is not None:
                setattr(self, name, check_number(name, getattr(self, name), above=0))
        self.betas = _sequence("betas", self.betas)
        if len(self.betas) != 2:
            raise UsageError(f"betas must be two numbers (beta1, beta2), got {self.betas!r}", "betas")
        self.betas = tuple(check_number("betas", b, minimum=0, below=1) for b in self.betas)
        self.target_modules = tuple(check_text("target_modules", m)
                                    for m in _sequence("target_modules", self.target_modules))
        self.eval_scales = tuple(check_number("eval_scales", v, minimum=0)
                                 for v in _sequence("eval_scales", self.eval_scales))
        for name in ("progressive", "stop_on_hacking", "resume", "tensorboard", "cpu", "progress",
                     "block_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be true or false, got {getattr(self, name)!r}", name)
        check_half_on_cpu("base_dtype", self.base_dtype, "cpu" if self.cpu or not torch.cuda.is_available() else "cuda")
        if self.strategy == "shortft":
            if self.segments > self.steps:
                raise UsageError(f"segments={self.segments} cannot exceed steps={self.steps}", "segments")
            if self.eta:
                raise UsageError("shortft jumps along the deterministic chain: eta must be 0", "eta")
        if self.warmup and self.lr_scheduler == "constant":  # diffusers' "constant" ignores num_warmup_steps
            raise UsageError(f"warmup={self.warmup} has no effect with lr_scheduler='constant'; use "
                             "'constant_with_warmup' (or cosine, linear, ...)", "warmup")
        if self.output.exists() and not self.output.is_dir():
            raise UsageError(f"output {self.output} exists and is not a folder", "output")

    @classmethod
    def from_dict(cls, values: dict) -> FinetuneConfig:
        """From a parsed config file; unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown fine-tuning option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
                             unknown[0])
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
    # steps -> the scheduler's extra set_timesteps arguments (FLUX's mu and sigmas: sdo.backbones.flow_schedule)
    schedule: Callable[[int], dict] | None = None
    # (n, generator) -> (n clean latents, their conditions): real data for ReFL's pre-training loss (pretrain_weight)
    data: Callable[[int, torch.Generator], tuple[torch.Tensor, list]] | None = None

    def solver(self, steps: int, eta: float = 0.0) -> Solver:
        """The pure solver of ``scheduler`` over ``steps`` steps, with the task's ``schedule``."""
        return solver_from_scheduler(self.scheduler, steps, eta=eta, **(self.schedule(steps) if self.schedule else {}))


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
