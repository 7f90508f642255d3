"""Training checkpoints that survive a kill: tensors in safetensors, the rest in JSON, written into a temporary
folder that is renamed into place (``os.replace``), then a ``latest.json`` pointer replaced the same way. A
run killed at any instant leaves the previous checkpoint whole; no pickle is read back.

A checkpoint holds named tensor groups (the LoRA, the optimizer's state, RNG states) and one JSON document
(step counters, the optimizer's param groups, the LR scheduler, Python's RNG state).

The fallback rule (:func:`load_latest`): resume from the checkpoint ``latest.json`` names; when the pointer or
that checkpoint is bad (not JSON, a missing folder, a truncated safetensors file, NaN or infinity in a tensor),
from the newest other ``step-*`` folder that loads cleanly, with a warning naming the bad file(s) and the
checkpoint used instead; when none loads, a :class:`~sdo.checks.UsageError` names the bad files.
:func:`save_checkpoint` never writes NaN or infinity (:class:`~sdo.checks.NonFiniteError`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checks import NonFiniteError, UsageError, check_finite

__all__ = [
    "atomic_write",
    "latest_checkpoint",
    "load_checkpoint",
    "load_latest",
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
    atomically, point ``root/latest.json`` at it, and delete all but the newest ``keep`` checkpoints (and any
    newer than ``step``: what a resumed run replaces). Refuses (:class:`NonFiniteError`) NaN or infinity."""
    for group, values in tensors.items():
        for name, value in values.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise NonFiniteError(f"refusing to write checkpoint step {step} in {root}: {group} tensor {name} "
                                     "holds NaN or infinity; the checkpoints already there are left as they were")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for group, values in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in values.items()}, str(tmp / f"{group}.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "groups": sorted(tensors)}, indent=1))
    if final.exists():  # a rerun of the same step (after a resume): the new copy wins
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json(root / "latest.json", {"step": step, "path": final.name})
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    mine = done.index(final) + 1  # those after it are an abandoned future (of a run resumed from an older one)
    for old in done[mine:] + done[: max(mine - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _why(error: Exception) -> str:
    return (error.strerror if isinstance(error, OSError) and error.strerror else str(error)).splitlines()[0]


def _pointer(root: Path) -> Path:
    """The folder ``root/latest.json`` names; a :class:`UsageError` naming the pointer when it is bad."""
    pointer = root / "latest.json"
    try:
        path = root / str(json.loads(pointer.read_text())["path"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{pointer}: unreadable ({type(error).__name__}: {_why(error)})") from None
    if not path.is_dir():
        raise UsageError(f"{pointer} names {path}, which is missing")
    return path


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint folder ``latest.json`` names (not loaded), or None when there is none or it is bad."""
    try:
        return _pointer(Path(root))
    except UsageError:
        return None


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``(tensors by group, meta)`` of a checkpoint folder written by :func:`save_checkpoint`; a
    :class:`UsageError` names the file that is missing, not JSON, not readable safetensors, or not finite."""
    path = Path(path)
    file = path / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{file}: unreadable ({type(error).__name__}: {_why(error)})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise UsageError(f"{file}: not a checkpoint's meta.json (no step)")
    tensors = {}
    for group in meta.get("groups") or sorted(p.stem for p in path.glob("*.safetensors")):
        file = path / f"{group}.safetensors"
        try:
            tensors[group] = load_file(str(file))
        except (OSError, SafetensorError) as error:
            raise UsageError(f"{file}: unreadable ({type(error).__name__}: {_why(error)})") from None
        for name, value in tensors[group].items():
            check_finite(f"{file} tensor {name}", value)
    return tensors, meta


def load_latest(root: str | Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]], dict] | None:
    """``(folder, tensors by group, meta)`` of the checkpoint to resume from, by the fallback rule of the module
    docstring; None when ``root`` holds no checkpoint."""
    root = Path(root)
    folders = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    if not folders and not (root / "latest.json").exists():
        return None
    problems, named = [], []
    try:
        named.append(_pointer(root))
    except UsageError as error:
        problems.append(str(error))
    for path in dict.fromkeys(named + folders):
        try:
            tensors, meta = load_checkpoint(path)
        except UsageError as error:
            problems.append(str(error))
            continue
        if problems:
            warnings.warn(f"{'; '.join(problems)}; resuming from {path} instead", stacklevel=2)
        return path, tensors, meta
    raise UsageError(f"no checkpoint in {root} loads: {'; '.join(problems)}")


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
