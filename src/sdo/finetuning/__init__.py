"""Reward fine-tuning with LoRA through the sampler: the options and result (:mod:`~sdo.finetuning.config`), the
loop (:mod:`~sdo.finetuning.trainer`), what a method decides (:mod:`~sdo.finetuning.method`), ShortFT
(:mod:`~sdo.finetuning.shortft`), and what they use: LoRA files (:mod:`~sdo.finetuning.lora`), checkpoints that
survive a kill (:mod:`~sdo.finetuning.checkpoints`), DRaFT+'s penalty (:mod:`~sdo.finetuning.anchor`) and the
reward-hacking guard (:mod:`~sdo.finetuning.guard`)."""

from ..checks import NonFiniteError
from .config import FinetuneConfig, FinetuneResult, FinetuneTask, methods
from .results import run_files
from .run import finetune, shortft

__all__ = ["FinetuneConfig", "FinetuneResult", "FinetuneTask", "NonFiniteError", "finetune", "methods", "run_files",
           "shortft"]
