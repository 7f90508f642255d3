"""``finetune``: reward fine-tuning with LoRA through the sampler, by the gradient method ``config.strategy``
names: ShortFT's chain shortened by a few-step model for ``"shortft"`` (:mod:`sdo.finetuning.shortft`), the
trainer's chain for the others (:mod:`sdo.finetuning.trainer`)."""

from __future__ import annotations

from .config import FinetuneConfig, FinetuneResult, FinetuneTask
from .shortft import shortft
from .trainer import TrainingRun, run_training

__all__ = ["finetune"]


def finetune(task: FinetuneTask, config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune ``task.model`` with LoRA on ``task.reward`` (see :mod:`sdo.finetuning.trainer`); the LoRA is added
    to the model in place and saved in ``config.output/lora`` (diffusers/peft safetensors format)."""
    if config.strategy == "shortft":
        return shortft(task, config)
    return run_training(TrainingRun(task, config))
