"""Checks of what a caller passes in, before any work: :class:`UsageError` (a caller's mistake, shown by the
``sdo`` command as one line with exit code 2, while an internal bug keeps its traceback), :class:`NonFiniteError`,
and the validators every entry point uses for types, finiteness and ranges. A leaf: imports no torch at import.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterable

__all__ = [
    "NonFiniteError",
    "UsageError",
    "check_choice",
    "check_device",
    "check_finite",
    "check_int",
    "check_number",
    "check_prompts",
    "check_text",
    "reading",
]


class UsageError(ValueError):
    """A caller's mistake: a bad option, file or input. ``option`` names the offending option when known."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class NonFiniteError(RuntimeError):
    """The numbers went non-finite during a run (too many updates in a row, or an update that made the weights
    non-finite); the last checkpoint is left intact."""


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int: an int or an integral float (``3.0``, as JSON may write it), never a bool, a fraction
    or a string; within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be an integer, got {type(value).__name__} {value!r}", name)
    if isinstance(value, numbers.Integral) or math.isfinite(value) and float(value).is_integer():
        value = int(value)
    else:
        raise UsageError(f"{name} must be a whole number, got {value!r}", name)
    _range(name, value, minimum, maximum)
    return value


def check_number(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
                 above: float | None = None, below: float | None = None) -> float:
    """``value`` as a finite float (an int or float, never a bool or a string) in ``[minimum, maximum]`` and
    ``(above, below)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a number, got {type(value).__name__} {value!r}", name)
    value = float(value)
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}", name)
    _range(name, value, minimum, maximum)
    if above is not None and not value > above:
        raise UsageError(f"{name} must be > {above:g}, got {value:g}", name)
    if below is not None and not value < below:
        raise UsageError(f"{name} must be < {below:g}, got {value:g}", name)
    return value


def _range(name: str, value, minimum, maximum) -> None:
    if minimum is not None and value < minimum:
        raise UsageError(f"{name} must be >= {minimum:g}, got {value:g}", name)
    if maximum is not None and value > maximum:
        raise UsageError(f"{name} must be <= {maximum:g}, got {value:g}", name)


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    """``value``, one of ``choices`` (strings)."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}; got {value!r}", name)
    return value


def check_text(name: str, value, *, allow_empty: bool = False) -> str:
    """``value``, a string that (unless ``allow_empty``) holds more than white space."""
    if not isinstance(value, str):
        raise UsageError(f"{name} must be a string, got {type(value).__name__} {value!r}", name)
    if not allow_empty and not value.strip():
        raise UsageError(f"{name} is empty: give some text", name)
    return value


def check_device(name: str, device):
    """``device`` as a torch.device that exists on this machine (a CUDA device on a machine without one is a
    one-line error, not a driver traceback later)."""
    import torch

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"{name}: not a torch device: {device!r}", name) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{name} {device}: CUDA is not available on this machine; use cpu", name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{name} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)", name)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{name} {device}: MPS is not available on this machine", name)
    return device


def check_half_on_cpu(name: str, dtype, device) -> None:
    """Refuse float16 on a CPU, with the reason: half-precision layers there are slow or missing and overflow to
    inf. ``dtype``: a torch dtype or its name; ``device``: a torch device or its name."""
    import torch

    if str(dtype).removeprefix("torch.") == "float16" and torch.device(device).type == "cpu":
        raise UsageError(f"{name} float16 needs a GPU: on a CPU half-precision layers are slow or missing and overflow "
                         "to inf; use float32 or bfloat16", name)


def check_finite(name: str, tensor) -> None:
    """Raise if the tensor ``name`` holds NaN or infinity (a latent, loaded weights, a checkpoint's tensors)."""
    import torch

    if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise UsageError(f"{name} holds {bad} non-finite value(s) (NaN or infinity) of {tensor.numel()}", name)


def check_prompts(name: str, prompts, tokenizer, max_length: int | None = None) -> list[str]:
    """``prompts`` (one string or several) as a list of non-empty strings; one longer than the text tower takes
    (``max_length``, default the tokenizer's ``model_max_length``) is cut there by the caller's tokenizer call
    (``truncation=True``), with a warning naming the limit."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UsageError(f"{name}: no prompt given", name)
    limit = int(max_length or tokenizer.model_max_length)
    for prompt in prompts:
        check_text(name, prompt)
        with warnings.catch_warnings():  # transformers' own warning about the length would say it less clearly
            warnings.simplefilter("ignore")
            count = len(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
        if count > limit:
            warnings.warn(f"{name} {prompt[:30]!r}... is {count} tokens long, but {type(tokenizer).__name__} takes "
                          f"{limit}: the text tower sees only the first {limit}", stacklevel=3)
    return prompts


@contextlib.contextmanager
def reading(path, what: str):
    """Errors while reading a user's file or folder (a truncated or foreign file, a folder missing a part) as one
    :class:`UsageError` naming ``path``, raised from the original so that its traceback stays reachable."""
    from safetensors import SafetensorError

    try:
        yield
    except UsageError:
        raise
    except (OSError, ValueError, TypeError, KeyError, EOFError, SafetensorError) as err:
        detail = " ".join(str(err).split())
        detail = detail if len(detail) <= 300 else detail[:300] + "..."
        raise UsageError(f"{path}: cannot read {what}: {detail or type(err).__name__}") from err
