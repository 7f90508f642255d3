"""What a fine-tuning method decides, apart from the loop that every method shares
(:mod:`sdo.finetuning.trainer`): which LoRA adapters it trains, how one differentiable sample is drawn, and what
changes between updates. :class:`Method` is the plain one (one LoRA, the sample of :func:`sdo.sample` with a
gradient strategy of the name table); :class:`sdo.finetuning.shortft.ShortFT` is the other."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from ..chain import Chain
from ..checks import UsageError
from ..denoiser import inner_model
from ..gradients import Strategy
from ..sampling import sample
from .lora import lora_parameters, lora_scale, lora_state_dict, save_lora

__all__ = ["Method"]


class Method:
    """A fine-tuning method: the LoRA adapters ``adapters`` (checkpoint group -> peft adapter name, each with its
    LoraConfig in ``configs``) on ``model``, the model to sample with in ``sampled`` (``model`` itself, or a wrapper
    that picks the adapters per call), and :meth:`rollout`, the sample of one micro-batch with the gradient the
    method keeps. The trainer calls :meth:`before_update` before each update and keeps :meth:`state` in its
    checkpoints."""

    def __init__(self, model: torch.nn.Module, adapters: dict[str, str], configs: dict, strategy: Strategy | None,
                 sampled: torch.nn.Module | None = None):
        self.model, self.adapters, self.configs, self.strategy = model, dict(adapters), dict(configs), strategy
        self.sampled = model if sampled is None else sampled
        self.params = [p for name in self.adapters.values() for p in lora_parameters(model, name)]

    def rollout(self, chain: Chain, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The sample of ``chain`` from ``x``, differentiable as the strategy allows (``generator``: its noise)."""
        return sample(chain, x, strategy=self.strategy, generator=generator)

    def before_update(self, run) -> dict:
        """Prepare the next update of ``run`` (a :class:`~sdo.finetuning.trainer.TrainingRun`); returns extra
        fields of its metrics record."""
        return {}

    def state(self) -> dict:
        """What a checkpoint keeps of the method beyond its LoRA weights, as JSON."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore :meth:`state` from a checkpoint."""

    # -- the LoRA weights -------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """The LoRA weights, by checkpoint group (one per adapter)."""
        return {group: lora_state_dict(self.model, name) for group, name in self.adapters.items()}

    def copy(self) -> dict[str, dict[str, torch.Tensor]]:
        """A copy of :meth:`tensors` that later updates do not change."""
        return {g: {k: v.detach().clone() for k, v in t.items()} for g, t in self.tensors().items()}

    def load(self, tensors: dict, path: Path) -> None:
        """Set the LoRA weights to ``tensors`` (as :meth:`tensors` gives them; read from ``path``)."""
        from peft import set_peft_model_state_dict

        for group, name in self.adapters.items():
            if group not in tensors:
                raise UsageError(f"{path}: the checkpoint holds no LoRA {group!r}; "
                                 "it was written by another kind of run")
            result = set_peft_model_state_dict(inner_model(self.model), tensors[group], adapter_name=name)
            if getattr(result, "unexpected_keys", None):
                raise UsageError(f"{path}: the checkpoint's LoRA does not fit this run ({result.unexpected_keys[:3]})")

    def scaled(self, scale: float) -> contextlib.AbstractContextManager:
        """A context in which the LoRA(s) act at ``scale`` (0: the base model)."""
        return _all_scaled(self.model, list(self.adapters.values()), scale)

    def save(self, folder: Path) -> None:
        """The LoRA as a folder diffusers reads (:func:`~sdo.finetuning.lora.save_lora`); several adapters each in a
        folder of its name."""
        for name in self.adapters.values():
            save_lora(self.model, folder if len(self.adapters) == 1 else folder / name, adapter_name=name,
                      config=self.configs[name])


@contextlib.contextmanager
def _all_scaled(model: torch.nn.Module, names: list[str], scale: float) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(lora_scale(model, scale, name))
        yield
