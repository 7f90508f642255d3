"""What every ``sdo`` command's parser shares: one-line argparse errors, the types that check numbers, devices
and folders as they are parsed, and the output folder each command settles before any work."""

from __future__ import annotations

import argparse
import datetime
import math
import os
from pathlib import Path

from ..checks import UsageError

__all__ = [
    "TASK_SCHEDULERS",
    "Parser",
    "bench_strategies",
    "device",
    "finite_float",
    "float_list",
    "folder",
    "fresh_folder",
    "int_at_least",
    "int_list",
    "name_list",
    "non_negative_float",
    "non_negative_int",
    "output_folder",
    "positive_float",
    "positive_int",
    "quiet_loading",
    "remove_if_empty",
    "rule_list",
]


class Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage dump): ``sdo demo: error: ...``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def finite_float(minimum: float, inclusive: bool):
    """An argparse type: a finite float > minimum (>= with ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and (value >= minimum if inclusive else value > minimum)):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {minimum:g}, "
                                             f"got {text}")
        return value

    return parse


positive_float = finite_float(0.0, inclusive=False)
non_negative_float = finite_float(0.0, inclusive=True)


def device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device type {device.type!r} (cpu, cuda, mps)")
    return text


def folder(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


def output_folder(args, prefix: str) -> Path:
    """The command's output folder, settled before any work: ``--output`` (a non-empty one only with
    ``--overwrite``) or a fresh ``<prefix>-<time>``; created and checked writable."""
    out = args.output
    if out is None:
        out = fresh_folder(prefix)
    elif out.is_dir() and any(out.iterdir()) and not getattr(args, "overwrite", False):
        raise FileExistsError(f"{out} is not empty; pass --overwrite to write into it, or choose another --output")
    if not out.exists():
        args.created_output = out  # removed again if the command fails before writing anything there (main)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the output folder {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"the output folder {out} is not writable")
    return out


def fresh_folder(prefix: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path(f"{prefix}-{stamp}"), 1
    while path.exists():
        n += 1
        path = Path(f"{prefix}-{stamp}-{n}")
    return path


def int_list(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text}")
    return values


def float_list(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(non_negative_float(v) for v in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}") from None


def bench_strategies() -> list[str]:
    from .bench import bench_rows

    return list(bench_rows())


def name_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in bench_strategies()]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown strategies {unknown}; choose from {', '.join(bench_strategies())}")
    return names


def rule_list(text: str) -> tuple[str, ...]:
    rules = tuple(v.strip() for v in text.split(",") if v.strip())
    if not rules or any(r not in ("plain", "sign") for r in rules):
        raise argparse.ArgumentTypeError(f"expected plain and/or sign, comma-separated; got {text!r}")
    return rules


# sdo.backbones.SCHEDULERS, spelled out so that parsing the command line imports no torch (a test keeps them equal)
TASK_SCHEDULERS = ("ddim", "dpm-solver++", "lcm", "euler")


def quiet_loading() -> None:
    """--no-progress: no loading bars from diffusers and transformers either."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def remove_if_empty(args) -> None:
    """The output folder this invocation created (``output_folder``), removed again if nothing was written there:
    a failed command leaves no empty folder of its own behind."""
    created = getattr(args, "created_output", None)
    if created is not None and created.is_dir() and not any(created.iterdir()):
        created.rmdir()
