"""LoRA arithmetic on saved LoRAs (``sdo lora scale | merge``): theta + alpha * delta (Fig. 13 of Dou et al.) and
theta + sum_i w_i delta_i, exactly, as plain (A, B) LoRAs that diffusers and peft load."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import torch

from ..checks import UsageError
from .lora_files import LORA_A, LORA_B, config_dict, lora_file_prefix, lora_modules, read_lora, write_lora

__all__ = ["merge_lora_files", "merge_loras", "scale_lora", "scale_lora_files"]


def _scaling(config: dict, name: str, rank: int) -> float:
    """peft's per-module scaling lora_alpha / r (/ sqrt(r) with rsLoRA), with rank_pattern and alpha_pattern."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config["lora_alpha"])
    if r != rank:
        raise UsageError(f"the config gives {name} rank {r} but its weights have rank {rank}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def scale_lora(state: dict[str, torch.Tensor], config: dict, alpha: float) -> tuple[dict[str, torch.Tensor], dict]:
    """The LoRA of delta alpha * dW, i.e. theta + alpha dtheta (Fig. 13): every lora_B times ``alpha``."""
    config = config_dict(config)
    lora_modules(state, config, "the LoRA to scale")
    if not math.isfinite(alpha):
        raise UsageError(f"alpha must be finite, got {alpha}")
    return {k: v * alpha if k.endswith(LORA_B) else v.clone() for k, v in state.items()}, config


def merge_loras(items: Sequence[tuple[dict[str, torch.Tensor], dict, float]]) -> tuple[dict[str, torch.Tensor], dict]:
    """One LoRA whose delta is sum_i w_i dW_i, exactly (Fig. 13: theta + alpha dtheta_aes + beta dtheta_hps).

    Ranks are concatenated: per module A = cat(A_i, dim 0), B = cat(w_i s_i B_i, dim 1) with s_i LoRA i's scaling
    for that module, so B A = sum_i w_i s_i B_i A_i. Block i has rank R_i (LoRA i's largest), zero-padded; a module
    missing from LoRA i gets a zero block. Merged r = lora_alpha = sum_i R_i (scaling 1); target_modules = union.
    """
    from peft import LoraConfig

    items = list(items)
    if not items:
        raise UsageError("merge_loras needs at least one (state, config, weight)")
    parsed, targets = [], set()
    for i, (state, config, weight) in enumerate(items):
        config = config_dict(config)
        if not math.isfinite(weight):
            raise UsageError(f"weight {i} is {weight}; merge weights must be finite")
        mods = lora_modules(state, config, f"LoRA {i}")
        if not mods:
            raise UsageError(f"LoRA {i} has no weights")
        t = config.get("target_modules")
        if not isinstance(t, (list, tuple)) or config.get("exclude_modules") or config.get("layers_to_transform"):
            raise UsageError(f"LoRA {i} selects modules by {t!r} (with exclude_modules/layers_to_transform: "
                             f"{config.get('exclude_modules')}, {config.get('layers_to_transform')}); merge_loras "
                             "needs target_modules as a list of names and no exclusions, to take their union")
        targets |= set(t)
        scaled = {n: (a, b * (weight * _scaling(config, n, a.shape[0]))) for n, (a, b) in mods.items()}
        parsed.append((scaled, max(a.shape[0] for a, _ in mods.values())))
    state = {}
    for name in sorted(set().union(*(mods for mods, _ in parsed))):
        present = [mods[name] for mods, _ in parsed if name in mods]
        a0, b0 = present[0]
        if any(a.shape[1:] != a0.shape[1:] or b.shape[0] != b0.shape[0] for a, b in present):
            raise UsageError(f"{name} has incompatible shapes across the LoRAs: "
                             f"{[(tuple(a.shape), tuple(b.shape)) for a, b in present]}; merge LoRAs of one model")
        dtype = functools.reduce(torch.promote_types, [t.dtype for pair in present for t in pair])
        As, Bs = [], []
        for mods, rank in parsed:
            a, b = mods.get(name, (a0.new_zeros(0, *a0.shape[1:]), b0.new_zeros(b0.shape[0], 0, *b0.shape[2:])))
            pad = rank - a.shape[0]
            As.append(torch.cat([a.to(dtype), a.new_zeros(pad, *a.shape[1:], dtype=dtype)], 0))
            Bs.append(torch.cat([b.to(dtype), b.new_zeros(b.shape[0], pad, *b.shape[2:], dtype=dtype)], 1))
        state[name + LORA_A], state[name + LORA_B] = torch.cat(As, 0), torch.cat(Bs, 1)
    r = sum(rank for _, rank in parsed)
    return state, config_dict(LoraConfig(r=r, lora_alpha=r, target_modules=sorted(targets)))


def scale_lora_files(src: str | os.PathLike, dst: str | os.PathLike, alpha: float) -> None:
    """Folder to folder :func:`scale_lora` (``sdo lora scale``); the keys filed as the source's."""
    write_lora(dst, *scale_lora(*read_lora(src), alpha), prefix=lora_file_prefix(src))


def merge_lora_files(srcs: Sequence[str | os.PathLike], weights: Sequence[float], dst: str | os.PathLike) -> None:
    """Folders to folder :func:`merge_loras` (``sdo lora merge``), one weight per source folder; the keys filed as
    the sources' (files of a UNet and of a transformer do not merge)."""
    if len(srcs) != len(weights):
        raise UsageError(f"{len(srcs)} LoRA folders but {len(weights)} weights; give one weight per folder")
    prefixes = {lora_file_prefix(src) for src in srcs} - {None}
    if len(prefixes) > 1:
        raise UsageError(f"the LoRAs are of different denoisers ({', '.join(sorted(prefixes))}); "
                         "merge LoRAs of one model")
    write_lora(dst, *merge_loras([(*read_lora(src), w) for src, w in zip(srcs, weights, strict=True)]),
               prefix=next(iter(prefixes), None))
