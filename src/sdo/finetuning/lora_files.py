"""LoRA folders on disk, in the format diffusers reads and writes.

The format (a folder) is what a diffusers pipeline's ``save_lora_weights`` writes (diffusers 0.42): the weights
in ``pytorch_lora_weights.safetensors`` under peft's keys behind the denoiser's component name
(``unet.down_blocks.1.attentions.0.to_q.lora_A.weight``; ``transformer.`` for SD3, FLUX, PixArt and other
transformers: :func:`~sdo.finetuning.lora.lora_prefix`), the LoraConfig as JSON in the safetensors metadata
``lora_adapter_metadata`` under the same prefix (``unet.r``, next to ``format: pt``). So a pipeline's own
``pipe.load_lora_weights(folder)`` loads it, and so does ``model.load_lora_adapter(folder, prefix="unet")``; the
plain config is also written to ``adapter_config.json``. :func:`read_lora` reads these files, the ones sdo wrote
before 2026-12 (no prefix), a model's ``save_lora_adapter`` files, and a pipeline trainer's file without a config
(the ranks read off the weights, ``lora_alpha = r``, as diffusers infers them).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ..checks import UsageError, reading
from .checkpoints import atomic_write

__all__ = ["LORA_A", "LORA_B", "config_dict", "lora_file_prefix", "lora_modules", "read_lora", "write_lora"]

_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
_CONFIG = "adapter_config.json"  # peft's CONFIG_NAME
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"  # the keys of a LoRA pair in a state dict
_COMPONENTS = ("unet", "transformer")  # the denoiser's component names in diffusers' pipeline LoRA files


def config_dict(config) -> dict:
    """A LoraConfig (or its dict) as plain JSON data, sets as sorted lists (what save_lora_adapter writes)."""
    return json.loads(json.dumps(config if isinstance(config, dict) else config.to_dict(), default=sorted))


def write_lora(folder: str | os.PathLike, state: dict[str, torch.Tensor], config: dict,
               prefix: str | None = None) -> None:
    """Write a LoRA folder (format in the module docstring), each file atomically (temporary file + os.replace);
    ``prefix``: the denoiser's component name (:func:`lora_prefix`) the keys and the config go under (None: none,
    the format of a model's ``save_lora_adapter``)."""
    from safetensors.torch import save_file

    config = config_dict(config)
    lora_modules(state, config, "the LoRA to write")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True)
    lead = "" if prefix is None else f"{prefix}."
    tensors = {lead + k: v.detach().cpu().contiguous() for k, v in state.items()}
    packed = json.dumps({lead + k: v for k, v in config.items()}, indent=2, sort_keys=True)
    metadata = {"format": "pt", _METADATA_KEY: packed}
    atomic_write(folder / _WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(folder / _CONFIG, lambda tmp: Path(tmp).write_text(text + "\n"))


def read_lora(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config dict) of a LoRA folder, keys without the component prefix (module docstring); the config
    from the safetensors metadata, else ``adapter_config.json``, else read off the weights."""
    state, config, _ = _read(folder)
    return state, config


def lora_file_prefix(folder: str | os.PathLike) -> str | None:
    """The component name (``unet``, ``transformer``) the keys of a LoRA folder are filed under; None if none. Reads
    the keys only."""
    from safetensors import safe_open

    path = _weights(folder)
    with reading(path, "the LoRA weights"), safe_open(path, framework="pt") as f:
        return _prefix(path, list(f.keys()))


def _weights(folder: str | os.PathLike) -> Path:
    path = Path(folder) / _WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a LoRA folder holds {_WEIGHTS} "
                                "(sdo.finetuning.lora.save_lora or diffusers' save_lora_weights write one)")
    return path


def _prefix(path: Path, keys: list[str]) -> str | None:
    """The denoiser's component the keys are filed under (None: no prefix); a file of text-encoder LoRAs only is
    refused, and one that also holds them is read for its denoiser part, with a warning."""
    parts = sorted({k.split(".", 1)[0] for k in keys})
    prefix = next((p for p in _COMPONENTS if p in parts), None)
    if prefix is None and parts and set(parts) <= {"text_encoder", "text_encoder_2", "text_encoder_3"}:
        raise UsageError(f"{path} holds text-encoder LoRA weights only ({', '.join(parts)}); sdo loads a "
                         "denoiser's LoRA (keys under unet. or transformer.)")
    if prefix is not None and len(parts) > 1:
        warnings.warn(f"{path} also holds LoRA weights of {[p for p in parts if p != prefix]}; sdo reads its {prefix} "
                      "part (it tunes the denoiser)", stacklevel=4)
    return prefix


def _read(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, str | None]:
    from safetensors import safe_open

    folder = Path(folder)
    with reading(_weights(folder), "the LoRA weights"), safe_open(_weights(folder), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors handle is not a dict)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UsageError(f"{folder / _WEIGHTS}: {bad[0]} has non-finite weights (NaN or inf; {len(bad)} tensors in "
                         "all); the training that wrote it diverged")
    prefix = _prefix(folder / _WEIGHTS, list(state))
    if prefix is not None:
        state = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
    if _METADATA_KEY in metadata:
        with reading(folder / _WEIGHTS, "the LoRA config in its metadata"):
            config = json.loads(metadata[_METADATA_KEY])
        if prefix is not None and any(k.startswith(f"{prefix}.") for k in config):
            config = {k.removeprefix(f"{prefix}."): v for k, v in config.items() if k.startswith(f"{prefix}.")}
        return state, config, prefix
    if (folder / _CONFIG).is_file():
        with reading(folder / _CONFIG, "the LoRA config"):
            return state, json.loads((folder / _CONFIG).read_text()), prefix
    return state, _inferred_config(state, folder), prefix


def _inferred_config(state: dict[str, torch.Tensor], folder: Path) -> dict:
    """The config of a LoRA file that carries none (a diffusers trainer's without metadata), as diffusers infers
    it: each module's rank from its lora_A, the most common rank as ``r`` (others in ``rank_pattern``),
    ``lora_alpha = r`` (scaling 1), the modules by full name."""
    ranks = {k.removesuffix(LORA_A): int(v.shape[0]) for k, v in state.items() if k.endswith(LORA_A)}
    if not ranks:
        raise UsageError(f"{folder} has no LoRA config ({_METADATA_KEY!r} safetensors metadata or {_CONFIG}) and no "
                         f"'<module>{LORA_A}' weights to read one from; save it with sdo.finetuning.lora.save_lora or "
                         "a diffusers pipeline's save_lora_weights")
    counts = list(ranks.values())
    r = max(set(counts), key=counts.count)
    return {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": sorted(ranks),
            "rank_pattern": {m: k for m, k in ranks.items() if k != r},
            "alpha_pattern": {m: k for m, k in ranks.items() if k != r}}


def lora_modules(state: dict[str, torch.Tensor], config: dict,
                 what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} of a plain LoRA state dict, checked: LoRA config, no DoRA/bias, paired finite weights."""
    if config.get("peft_type", "LORA") != "LORA":
        raise UsageError(f"{what} is not a LoRA (peft_type={config['peft_type']!r})")
    for flag, name in (("use_dora", "DoRA (a magnitude vector, not a low-rank delta)"), ("lora_bias", "a LoRA bias")):
        if config.get(flag):
            raise UsageError(f"{what} uses {name}; scale/merge handle plain LoRA (A, B) only: train without {flag}")
    other = [k for k in state if not k.endswith((LORA_A, LORA_B))]
    if other:
        raise UsageError(f"{what} holds non-LoRA weights {other[:4]}; "
                         f"expected only '<module>{LORA_A}' and '<module>{LORA_B}'")
    out = {}
    for key in state:
        name = key.removesuffix(LORA_A).removesuffix(LORA_B)
        if name + LORA_A not in state or name + LORA_B not in state:
            raise UsageError(f"{what}: {name} has only one of lora_A/lora_B")
        a, b = state[name + LORA_A], state[name + LORA_B]
        if a.ndim not in (2, 4) or b.ndim != a.ndim or b.shape[1] != a.shape[0] or b.shape[2:] not in ((), (1, 1)):
            raise UsageError(f"{what}: {name} has A {tuple(a.shape)} and B {tuple(b.shape)}, not a Linear "
                             "((r, in), (out, r)) or Conv2d ((r, in, kh, kw), (out, r, 1, 1)) LoRA")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise UsageError(f"{what}: {name} has non-finite weights; the training that wrote it diverged")
        out[name] = (a, b)
    return out
