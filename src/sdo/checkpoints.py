"""Training checkpoints that survive a kill: tensors in safetensors, the rest in JSON, written into a temporary
folder that is renamed into place (``os.replace``), then a ``latest.json`` pointer replaced the same way. A
run killed at any instant leaves the previous checkpoint whole; no pickle is read back.

A checkpoint holds named tensor groups (the LoRA, the optimizer's state, RNG states) and one JSON document
(step counters, the optimizer's param groups, the LR scheduler, Python's RNG state).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "atomic_write",
    "latest_checkpoint",
    "load_checkpoint",
    "load_optimizer_state",
    "optimizer_state",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_json",
]


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then ``os.replace`` it onto ``path``, with the
    permissions a plain ``open`` would give (``mkstemp``'s own are 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data) -> None:
    """``data`` as JSON in ``path``, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, default=str)))


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict,
                    keep: int = 2) -> Path:
    """Write ``root/step-<step>/`` (one ``<group>.safetensors`` per entry of ``tensors`` and ``meta.json``)
    atomically, point ``root/latest.json`` at it, and delete all but the newest ``keep`` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for group, values in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in values.items()}, str(tmp / f"{group}.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
    if final.exists():  # a rerun of the same step (after a resume): the new copy wins
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json(root / "latest.json", {"step": step, "path": final.name})
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[: max(len(done) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``latest.json`` names, or None when the folder has none."""
    pointer = Path(root) / "latest.json"
    if not pointer.is_file():
        return None
    path = Path(root) / json.loads(pointer.read_text())["path"]
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which is missing or incomplete")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``(tensors by group, meta)`` of a checkpoint folder written by :func:`save_checkpoint`."""
    path = Path(path)
    tensors = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    return tensors, json.loads((path / "meta.json").read_text())


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """A torch optimizer's ``state_dict`` split into tensors (``"<param>.<name>"``) and JSON (the rest)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG a run draws from: the named torch generators, torch's global (CPU and CUDA) generators,
    Python's and NumPy's, as (tensors, JSON)."""
    tensors = {f"generator.{k}": g.get_state() for k, g in generators.items()}
    tensors["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(generators: dict[str, torch.Generator], tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`rng_state`."""
    for k, g in generators.items():
        g.set_state(tensors[f"generator.{k}"])
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
