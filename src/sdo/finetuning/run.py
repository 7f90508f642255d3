"""Reward fine-tuning with LoRA through the sampler: the trainer's loop (:mod:`sdo.finetuning.trainer`) with the
method ``config.strategy`` names, ShortFT's chain shortened by a few-step model for ``"shortft"``
(:mod:`sdo.finetuning.shortft`), a gradient strategy of the name table for the others."""

from __future__ import annotations

from dataclasses import replace

from .config import FinetuneConfig, FinetuneResult, FinetuneTask
from .trainer import TrainingRun, run_training

__all__ = ["finetune", "shortft"]


def finetune(task: FinetuneTask, config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune ``task.model`` with LoRA on ``task.reward`` (see :mod:`sdo.finetuning.trainer`); the LoRA is added
    to the model in place and saved in ``config.output/lora`` (diffusers/peft safetensors format)."""
    return run_training(TrainingRun(task, config))


def shortft(task: FinetuneTask, config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune ``task.model`` with ShortFT (:mod:`sdo.finetuning.shortft`) on ``task.reward``, through
    ``task.few_step``. ``config`` is a :class:`~sdo.FinetuneConfig` (its ``strategy`` is taken as ``"shortft"``;
    ``segments`` and ``progressive`` apply). The LoRAs are saved in ``config.output/lora/segment_j`` with
    ``shortft.json``; load them for inference with :func:`~sdo.finetuning.shortft.load_shortft`."""
    if config.strategy != "shortft":
        config = replace(config, strategy="shortft")
    return finetune(task, config)
