"""The page's Edit tab without the page: text-guided editing of a held-out digit (or an image file) on the embedded
models, by several strategies one after another from the same DDIM-inverted latent, each exactly as ``sdo edit``
runs it (:func:`sdo.recipes.latent_tasks.edit_digits`) and writing what it writes, one folder per strategy."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checks import UsageError, check_int, check_number, check_text

__all__ = ["EditRequest", "check_edit", "digit_choices", "embedded_models", "run_edit"]

_MODELS: dict[str, tuple] = {}
_LOCK = threading.Lock()


@dataclass
class EditRequest:
    """What the Edit tab sends: a held-out ``digit`` (0-296) or an ``image`` file, the edit ``prompt``, the
    ``strategies`` to run one after another, and ``sdo edit``'s options."""

    prompt: str
    strategies: list[str] = field(default_factory=lambda: ["sdo"])
    digit: int | None = 3
    image: str | None = None
    iterations: int = 50
    lr: float = 0.01
    lam: float = 0.5
    start_t: int = 600
    steps: int = 50


def check_edit(req: EditRequest, pipeline: bool = False) -> list:
    """Every option, before any work, with the one-line messages of the command line; returns the strategies.
    ``pipeline``: the page edits a local pipeline's image (an uploaded image is needed, no digit)."""
    from ..embedded.digits import HELD_OUT
    from ..gradients import check_latent_gradient, get_strategy

    check_text("prompt", req.prompt)
    if not req.strategies:
        raise UsageError("choose at least one strategy", "strategy")
    strategies = [get_strategy(name) for name in req.strategies]
    for strategy in strategies:
        check_latent_gradient(strategy)
    check_int("iterations", req.iterations, minimum=1)
    check_number("lr", req.lr, above=0)
    check_number("lam", req.lam, minimum=0)
    check_int("start_t", req.start_t, minimum=0, maximum=999)
    check_int("steps", req.steps, minimum=1)
    if pipeline and req.image is None:
        raise UsageError("editing a pipeline's image needs an image: upload one", "image")
    if req.image is None:
        if req.digit is None:
            raise UsageError("pick a held-out digit or upload an image", "digit")
        check_int("digit", req.digit, minimum=0, maximum=HELD_OUT - 1)
    elif not Path(req.image).is_file():
        raise FileNotFoundError(f"--image {req.image}: no such file")
    return strategies


def embedded_models(device: str = "cpu") -> tuple:
    """The embedded digits models and image-text model, loaded once per process (read only: runs share them)."""
    from ..embedded import load_digit_clip, load_digits

    with _LOCK:
        if device not in _MODELS:
            _MODELS[device] = (load_digits(device), load_digit_clip(device))
        return _MODELS[device]


def digit_choices(count: int = 40) -> torch.Tensor:
    """The first ``count`` held-out digits (the gallery to pick from), (count, 1, 16, 16) in [-1, 1]."""
    from ..embedded.digits import load_dataset

    return load_dataset("test")[0][:count]


def run_edit(req: EditRequest, out: Path, report: Callable[[dict], None] = lambda event: None,
             stop: threading.Event | None = None, device: str = "cpu", pipeline: tuple | None = None) -> list[dict]:
    """Run the edit of ``req`` by each strategy into ``out/<strategy>/`` (``before_after.png``, ``loss.png``,
    ``metrics.json``) and zip ``out`` as ``out.zip``. ``report`` gets ``{"strategy", "iteration", "loss"}`` at every
    iteration and ``{"strategy", "done": metrics}`` after each; a set ``stop`` ends the current strategy at its next
    iteration and skips the rest (``{"cancelled": True}``). Returns the metrics of the strategies that finished.
    ``pipeline``: ``(pipe, clip, tokenizer)`` of a local pipeline and CLIP folder (``sdo edit --model --clip``'s
    edit of the uploaded image) instead of the embedded digits."""
    from ..recipes.latent_tasks import edit, edit_digits, load_digit_image

    strategies = check_edit(req, pipeline is not None)
    if pipeline is not None:
        from ..backbones import load_image

        pipe, clip_model, tokenizer = pipeline
        image = load_image(req.image, pipe.image_size)
    else:
        models, clip = embedded_models(device)
        image = (load_digit_image(req.image) if req.image is not None
                 else digit_choices(req.digit + 1)[req.digit : req.digit + 1])
    stop = stop or threading.Event()
    finished = []
    for name, strategy in zip(req.strategies, strategies, strict=True):
        if stop.is_set():
            break

        def callback(iteration, x0, loss, name=name):
            report({"strategy": name, "iteration": iteration, "loss": float(loss.mean())})
            return stop.is_set()

        common = {"lam": req.lam, "start_t": req.start_t, "steps": req.steps, "strategy": strategy,
                  "iterations": req.iterations, "lr": req.lr, "progress": False, "callback": callback}
        if pipeline is not None:
            result = edit(pipe, clip_model, tokenizer, image, req.prompt, **common)
        else:
            result = edit_digits(image, req.prompt, device=device, models=models, clip=clip, **common)
        if stop.is_set():
            break
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in asdict(req).items() if k != "strategies"} | {"strategy": name}
        metrics = result.save(folder, "edit", req.prompt, name, settings)
        finished.append({"strategy": name, **metrics, "before": result.before, "after": result.after})
        report({"strategy": name, "done": metrics})
    if stop.is_set():
        report({"cancelled": True})
        return finished
    shutil.make_archive(str(out), "zip", out)
    return finished
