"""The page's Cost tab without the page: one gradient per strategy, its time and memory and the sweep over N, by
``sdo bench`` itself in a process of its own (:class:`~sdo.ui.jobs.CommandJob`: its code, its checks and one-line
messages, its files), and what its folder holds. The model is the embedded digits UNet, or a local pipeline's
denoiser (``sdo ui --model``): built from its folder's config with random weights, as ``sdo bench --model
<config.json>`` builds it, since what a gradient costs does not depend on the weights' values."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checks import UsageError

__all__ = ["CostRequest", "bench_command", "denoiser_config", "read_bench"]


@dataclass
class CostRequest:
    """``strategies`` timed on one latent gradient through ``steps`` DDIM steps of batch ``batch``, and again at each
    N of ``sweep``; ``model``: a local pipeline folder (default: the embedded digits)."""

    strategies: list[str] = field(default_factory=lambda: ["sdo", "full", "adjoint"])
    steps: int = 20
    sweep: str = "5,10,20"
    batch: int = 2
    model: str | None = None


def denoiser_config(pipeline: str | Path) -> Path:
    """The config of a diffusers pipeline folder's denoiser: ``unet/config.json`` or ``transformer/config.json``."""
    for part in ("unet", "transformer"):
        config = Path(pipeline) / part / "config.json"
        if config.is_file():
            return config
    raise UsageError(f"{pipeline} has neither unet/config.json nor transformer/config.json: not a diffusers pipeline "
                     "folder sdo can time", "model")


def bench_command(req: CostRequest, output: Path, device: str = "cpu") -> list[str]:
    """The ``sdo bench`` arguments of ``req`` into ``output`` on ``device``: the latent rows only, one timed round, no
    quality or fidelity section (the page's quick view; ``sdo bench`` itself checks every value)."""
    model = ["--model", str(denoiser_config(req.model))] if req.model is not None else []
    return ["bench", *model, "--device", str(device), "--strategies", ",".join(req.strategies) or "none",
            "--steps", str(req.steps), "--sweep", str(req.sweep), "--batch", str(req.batch), "--repeats", "1",
            "--no-params", "--no-fidelity", "--guidance-scales", "none", "--quality-iterations", "0",
            "--output", str(output), "--no-progress"]


def read_bench(folder: str | Path) -> dict:
    """``table`` (bench.md's text) and ``images`` (its cost and sweep plots, those that exist) of a bench folder."""
    folder = Path(folder)
    images = [folder / name for name in ("cost.png", "sweep_time.png", "sweep_memory.png") if (folder / name).is_file()]
    table = (folder / "bench.md").read_text() if (folder / "bench.md").is_file() else ""
    return {"table": table, "images": images}
