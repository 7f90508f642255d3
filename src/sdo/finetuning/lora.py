"""LoRA adapters on a diffusers denoiser (UNet2DModel, UNet2DConditionModel, PixArt/DiT transformers), via peft.

LoRA (Hu et al. 2021, Eq. 3) keeps a weight W0 frozen and trains a low-rank delta: h = W0 x + s B A x, with
s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA). The finetuning tasks train A and B only; the paper's Fig. 13
composes finetuned models, theta + alpha dtheta_aes + beta dtheta_hps, which :func:`scale_lora` and
:func:`merge_loras` build exactly as one LoRA file.

Injection goes through peft's ``inject_adapter_in_model`` for every model (diffusers' UNet2DModel has no
``add_adapter``). Adapters stack: each one added or loaded is active next to the others, with its own scale
(:func:`set_lora_scale`). LoRA weights are float32 on a half-precision base.

Files: :mod:`sdo.finetuning.lora_files` (the format diffusers pipelines write and read).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..checks import UsageError
from ..denoiser import inner_model
from .lora_files import read_lora, write_lora

__all__ = [
    "DEFAULT_TARGETS",
    "add_lora",
    "delta_weights",
    "load_lora",
    "lora_disabled",
    "lora_layers",
    "lora_parameters",
    "lora_prefix",
    "lora_scale",
    "lora_state_dict",
    "save_lora",
    "set_lora_scale",
]

#: the attention projections of diffusers' Attention (UNets and DiT/PixArt transformers alike)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_prefix(model: nn.Module) -> str:
    """The component name a diffusers pipeline files ``model``'s LoRA keys under: ``transformer`` for a transformer
    (SD3, FLUX, PixArt, DiT: the pipelines' ``transformer_name``), ``unet`` for a UNet (``unet_name``)."""
    return "transformer" if "Transformer" in type(inner_model(model)).__name__ else "unet"


def lora_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    """(module name, peft LoraLayer) of every module carrying ``adapter_name``."""
    model = inner_model(model)
    from peft.tuners.lora import LoraLayer

    have = sorted(getattr(model, "peft_config", {}))
    if adapter_name not in have:
        raise UsageError(f"{type(model).__name__} has no LoRA adapter {adapter_name!r} (it has {have or 'none'}); "
                         "add one with add_lora or load_lora, or pass adapter_name")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]


def _adapter_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every adapter of every peft layer (LoRA A/B of all adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [p for m in model.modules() if isinstance(m, BaseTunerLayer)
            for name in m.adapter_layer_names for p in getattr(m, name).parameters()]




def _config_object(config: dict):
    """The LoraConfig of a saved config dict; keys this peft does not know must be unset (None, False, empty)."""
    from peft import LoraConfig

    if config.get("peft_type", "LORA") != "LORA":
        raise UsageError(f"not a LoRA config (peft_type={config['peft_type']!r}); "
                         "sdo.finetuning.lora handles LoRA adapters only")
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(k for k, v in config.items() if k not in known and v not in (None, False, {}, [], ""))
    if unknown:
        raise UsageError(f"the LoRA config sets {unknown}, unknown to this peft version; upgrade peft to load it")
    return LoraConfig(**{k: v for k, v in config.items() if k in known})


def _inject(model: nn.Module, config, adapter_name: str, *, trainable: bool, seed: int | None, fork: bool,
            load=None) -> None:
    """Inject ``config`` as ``adapter_name``: base frozen, LoRA at least float32 and requiring grad iff ``trainable``,
    active next to the other adapters (whose active sets and requires_grad are kept). Then ``load()``; if that
    raises, the adapter is removed again and the model restored."""
    model = inner_model(model)
    from peft import NoMatchingPeftModuleError, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if adapter_name in getattr(model, "peft_config", {}):
        raise UsageError(f"{type(model).__name__} already has a LoRA adapter {adapter_name!r}; pass another "
                         "adapter_name, or start from a model without it")
    grads = {id(p): p.requires_grad for p in _adapter_params(model)}
    active = {id(m): m.active_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)}
    with torch.random.fork_rng() if fork or seed is not None else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Already found a `peft_config` attribute")  # stacking is meant
        if seed is not None:
            torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
        except NoMatchingPeftModuleError as e:
            layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            raise UsageError(f"no module of {type(model).__name__} matches target_modules={config.target_modules}; "
                             f"its Linear/Conv2d modules include {layers[:12]} ({len(layers)} in all): target a name's "
                             "last part(s), e.g. 'to_q', 'to_out.0' or 'conv1'") from e

    def settle(extra: list[str], new: set[int]) -> None:
        # peft made adapter_name the only active one everywhere and reset requires_grad: stack, then restore
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.set_adapter(list(dict.fromkeys([*active.get(id(m), []), *extra])))
        model.requires_grad_(False)
        for p in _adapter_params(model):
            p.requires_grad_(trainable if id(p) in new else grads.get(id(p), False))

    new = set()
    for _, m in lora_layers(model, adapter_name):
        for d in (m.lora_A, m.lora_B):
            d[adapter_name].to(torch.promote_types(d[adapter_name].weight.dtype, torch.float32))  # half -> float32
            new.update(id(p) for p in d[adapter_name].parameters())
    settle([adapter_name], new)
    try:
        if load is not None:
            load()
    except BaseException:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Adapter .* was active which is now deleted")
            for _, m in lora_layers(model, adapter_name):
                m.delete_adapter(adapter_name)
        model.peft_config.pop(adapter_name)
        settle([], set())
        raise


def add_lora(model: nn.Module, *, rank: int = 4, alpha: float | None = None,
             target_modules: Sequence[str] | str = DEFAULT_TARGETS, adapter_name: str = "default",
             init_seed: int | None = None):
    """Add a trainable LoRA (Hu et al. 2021) to ``model`` in place and return its ``peft.LoraConfig``.

    Every base parameter is frozen; the LoRA weights require grad, in float32 on a bf16/fp16 base (else the base's).
    ``lora_alpha = alpha`` (``rank`` when None). ``target_modules``: module-name suffixes, or one regex string, as
    peft takes them. peft's init draws A (Kaiming-uniform) and zeroes B, so the output is unchanged; with
    ``init_seed`` A is drawn under ``torch.random.fork_rng`` from that seed (reproducible, global RNG untouched).
    """
    from peft import LoraConfig

    if rank < 1:
        raise UsageError(f"rank must be a positive integer, got {rank}")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=targets)
    _inject(model, config, adapter_name, trainable=True, seed=init_seed, fork=False)
    return config


def lora_parameters(model: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """The LoRA A and B weights of ``adapter_name``, in ``model.named_parameters()`` order (for the optimizer)."""
    model = inner_model(model)
    ids = {id(p) for _, m in lora_layers(model, adapter_name) for d in (m.lora_A, m.lora_B)
           for p in d[adapter_name].parameters()}
    return [p for p in model.parameters() if id(p) in ids]


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """peft's ``get_peft_model_state_dict``: keys ``<module>.lora_A.weight`` / ``.lora_B.weight``, no adapter name."""
    model = inner_model(model)
    from peft import get_peft_model_state_dict

    lora_layers(model, adapter_name)
    return get_peft_model_state_dict(model, adapter_name=adapter_name)




def save_lora(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default", config=None) -> None:
    """Save adapter ``adapter_name`` as a LoRA folder that the model's diffusers pipeline loads with
    ``pipe.load_lora_weights(folder)`` (keys under :func:`lora_prefix`); ``config``: the LoraConfig add_lora
    returned (default: the model's ``peft_config[adapter_name]``)."""
    model = inner_model(model)
    state = lora_state_dict(model, adapter_name)
    write_lora(folder, state, model.peft_config[adapter_name] if config is None else config, lora_prefix(model))










def load_lora(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default", trainable: bool = False):
    """Inject a saved LoRA as ``adapter_name`` (config from the folder) and load its weights with peft's
    ``set_peft_model_state_dict``; frozen unless ``trainable``. Returns the LoraConfig. Missing, unexpected or
    mis-shaped weights raise, and leave the model without the adapter."""
    from peft import set_peft_model_state_dict

    state, saved = read_lora(folder)
    config = _config_object(saved)

    def load():
        expected = lora_state_dict(model, adapter_name)
        problems = [f"missing {k}" for k in expected if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in expected]
        problems += [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
                     if k in state and state[k].shape != v.shape]
        if not problems:
            result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
            problems = [f"unexpected {k}" for k in result.unexpected_keys]
        if problems:
            raise UsageError(f"{folder} does not fit {type(model).__name__} ({len(problems)} problems: "
                             f"{problems[:6]}); load it into the model it was trained on")

    _inject(model, config, adapter_name, trainable=trainable, seed=None, fork=True, load=load)
    return config




def delta_weights(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """{module name: dW} of ``adapter_name`` at its current scale (peft's ``get_delta_weight``; keeps the graph)."""
    return {n: m.get_delta_weight(adapter_name) for n, m in lora_layers(model, adapter_name)}


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its frozen base inside (every peft layer disabled, as DRaFT+'s regularizer needs);
    afterwards each layer's state and each LoRA parameter's requires_grad are as before. Backward through a graph
    built outside must run after the context exits (peft clears requires_grad of disabled adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise UsageError(f"{type(model).__name__} has no LoRA layers, so lora_disabled would change nothing; "
                         "add_lora or load_lora first")
    was = [(m, m.disable_adapters) for m in layers]
    flags = [(p, p.requires_grad) for p in _adapter_params(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m, disabled in was:
            m.enable_adapters(not disabled)
        for p, flag in flags:
            p.requires_grad_(flag)


def set_lora_scale(model: nn.Module, scale: float, adapter_name: str = "default") -> None:
    """Interpolate at inference: theta + scale * dtheta (0 = base, 1 = trained), via peft's ``LoraLayer.set_scale``."""
    if not math.isfinite(scale):
        raise UsageError(f"scale must be finite, got {scale}")
    for _, m in lora_layers(model, adapter_name):
        m.set_scale(adapter_name, scale)


@contextlib.contextmanager
def lora_scale(model: nn.Module, scale: float, adapter_name: str = "default") -> Iterator[nn.Module]:
    """:func:`set_lora_scale` inside the context; each layer's previous scaling restored on exit."""
    saved = [(m, m.scaling[adapter_name]) for _, m in lora_layers(model, adapter_name)]
    try:
        set_lora_scale(model, scale, adapter_name)
        yield model
    finally:
        for m, s in saved:
            m.scaling[adapter_name] = s
