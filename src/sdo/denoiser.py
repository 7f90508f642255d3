"""Denoisers: ``denoiser(x, t) -> model_out``, with conditioning and classifier-free guidance bound in.

Wraps a diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``), a transformer backbone
(``DiTTransformer2DModel``, ``PixArtTransformer2DModel``) or any callable ``model(x, t, **cond)`` that
returns a tensor, a tuple whose first item is the output, or an object with ``.sample``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import torch

from .checks import UsageError, check_finite, check_number

__all__ = ["Denoiser", "checkpoint_blocks", "inner_model", "map_tensors"]


def inner_model(model):
    """The diffusers model inside ``model``: ``model.inner`` for a denoiser that wraps one to change how it is called
    (:class:`sdo.backbones.families.FluxDenoiser`), else ``model`` itself. Its LoRA, its gradient checkpointing and
    its files are the inner model's."""
    return getattr(model, "inner", model)


def checkpoint_blocks(model) -> None:
    """Turn on ``model``'s own gradient checkpointing inside its blocks (diffusers' ``enable_gradient_checkpointing``):
    a call that keeps a graph stores each block's input only and recomputes the rest in backward, the same gradient
    for less memory (what the one graph-keeping call of SDO needs at SDXL/FLUX size). A model without it is a
    :class:`~sdo.checks.UsageError`."""
    model = inner_model(model)
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise UsageError(f"{type(model).__name__} has no gradient checkpointing of its own (diffusers' "
                         "enable_gradient_checkpointing); run without block checkpointing")
    model.enable_gradient_checkpointing()


def map_tensors(fn, value, leaf: type | None = None):
    """Apply ``fn`` to every tensor (or, with ``leaf``, every instance of that type) of a nested value: dicts,
    tuples, lists and dataclasses (a conditioning value, a :class:`~sdo.SolverState`)."""
    if isinstance(value, leaf) if leaf is not None else torch.is_tensor(value):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(fn, v, leaf) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(fn, v, leaf) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: map_tensors(fn, getattr(value, f.name), leaf)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def _cat(uncond, cond, key: str):
    """Batch the unconditional and conditional keyword arguments for one guided model call."""
    if torch.is_tensor(cond):
        if not torch.is_tensor(uncond):
            raise UsageError(f"uncond[{key!r}] must be a tensor like cond[{key!r}]")
        return torch.cat([uncond, cond])
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            raise UsageError(f"uncond[{key!r}] and cond[{key!r}] must have the same keys")
        return {k: _cat(uncond[k], cond[k], f"{key}.{k}") for k in cond}
    if isinstance(cond, (tuple, list)):
        if not isinstance(uncond, (tuple, list)) or len(uncond) != len(cond):
            raise UsageError(f"uncond[{key!r}] and cond[{key!r}] must be sequences of the same length")
        return type(cond)(_cat(u, c, f"{key}[{j}]") for j, (u, c) in enumerate(zip(uncond, cond, strict=True)))
    if uncond is not cond and uncond != cond:
        raise UsageError(f"uncond[{key!r}] and cond[{key!r}] differ but are not tensors: cannot batch them")
    return cond


class Denoiser:
    """``Denoiser(model, cond=None, uncond=None, guidance_scale=None)``; call as ``denoiser(x, t)``.

    ``cond`` and ``uncond`` are dicts of keyword arguments for the model (``class_labels``,
    ``encoder_hidden_states``, ``added_cond_kwargs``, ...). Tensors with batch size 1 are broadcast to the
    latent's batch. With ``guidance_scale`` set, the output is classifier-free guidance (Ho & Salimans, 2022),
    ``u + s (c - u)``, from one batched call on ``[uncond, cond]``. Models whose output has twice the latent's
    channels (a learned variance, as in DiT and PixArt) give the first half, as their pipelines do.
    """

    def __init__(
        self,
        model,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        guidance_scale: float | None = None,
    ):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self.cond = dict(cond or {})
        self.uncond = None if uncond is None else dict(uncond)
        self.guidance_scale = None if guidance_scale is None else check_number("guidance_scale", guidance_scale)
        if self.guidance_scale is not None and self.uncond is None:
            raise UsageError("guidance_scale needs uncond: the keyword arguments of the unconditional branch")
        if self.uncond is not None and self.guidance_scale is None:
            raise UsageError("uncond was given without guidance_scale")
        if self.uncond is not None and set(self.uncond) != set(self.cond):
            raise UsageError(f"cond and uncond must have the same keys, got {sorted(self.cond)} and "
                             f"{sorted(self.uncond)}")
        forward = getattr(model, "forward", model)
        try:
            params = inspect.signature(forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._timestep_keyword = "timestep" in params  # diffusers models; PixArt's 2nd positional is not t
        config = getattr(model, "config", None)
        self.in_channels = getattr(config, "in_channels", None)
        out_channels = getattr(config, "out_channels", None)
        self._learned_variance = (
            self.in_channels is not None and out_channels is not None and out_channels == 2 * self.in_channels
        )

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None

    def _parameter(self) -> torch.Tensor | None:
        parameters = getattr(self.model, "parameters", None)
        return next(parameters(), None) if parameters is not None else None

    def check(self, x: torch.Tensor) -> None:
        """Raise a clear error when the latent cannot go through the model (channels, dtype, device)."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"the latent must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if self.in_channels is not None and (x.ndim < 2 or x.shape[1] != self.in_channels):
            raise UsageError(
                f"latent of shape {tuple(x.shape)} does not fit the model: it expects {self.in_channels} channels "
                "in dimension 1 (batch, channels, ...)"
            )
        check_finite("the latent", x)
        factor = self._downsampling()
        if factor > 1 and x.ndim == 4 and (x.shape[-1] % factor or x.shape[-2] % factor):
            raise UsageError(f"latent of shape {tuple(x.shape)} does not fit the model: its height and width must be "
                             f"multiples of {factor} (the model downsamples by {factor})")
        for name, value in self.cond.items():
            size = value.shape[0] if torch.is_tensor(value) and value.ndim > 0 else None
            if size not in (None, 1, x.shape[0]):
                raise UsageError(f"cond[{name!r}] has a batch of {size} but the latent has {x.shape[0]}: give one "
                                 "condition, or one per latent", name)
        p = self._parameter()
        if p is not None and p.dtype != x.dtype:
            raise UsageError(f"latent dtype {x.dtype} differs from the model's {p.dtype}; cast one of them")
        if p is not None and p.device != x.device:
            raise UsageError(f"device mismatch: latent on {x.device}, model on {p.device}; move one of them")

    def _downsampling(self) -> int:
        """How much a diffusers UNet shrinks its input (2 per down block but the last); 1 when unknown."""
        config = getattr(self.model, "config", None)
        blocks = getattr(config, "down_block_types", None)
        patch = getattr(config, "patch_size", None)  # transformers (PixArt, DiT): the patch side
        if blocks:
            return 2 ** (len(blocks) - 1)
        return int(patch) if isinstance(patch, int) else 1

    def _call(self, x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
        t = t.to(x.device).reshape(-1).expand(x.shape[0])
        out = self.model(x, timestep=t, **kwargs) if self._timestep_keyword else self.model(x, t, **kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not torch.is_tensor(out):
            raise TypeError(f"the model returned {type(out).__name__}, expected a tensor or an output with .sample")
        if self._learned_variance:
            out = out[:, : x.shape[1]]
        return out

    def _bind(self, kwargs: dict, batch: int) -> dict:
        def expand(v):
            if v.ndim > 0 and v.shape[0] == 1 and batch > 1:
                return v.expand(batch, *v.shape[1:])
            return v

        return {k: map_tensors(expand, v) for k, v in kwargs.items()}

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if not self.guided:
            return self._call(x, t, self._bind(self.cond, batch))
        cond, uncond = self._bind(self.cond, batch), self._bind(self.uncond, batch)
        kwargs = {k: _cat(uncond[k], cond[k], k) for k in cond}
        t = t.reshape(-1)
        if t.numel() > 1:  # per-item timesteps: one for each half of the guided batch
            t = torch.cat([t, t])
        out_uncond, out_cond = self._call(torch.cat([x, x]), t, kwargs).chunk(2)
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)
