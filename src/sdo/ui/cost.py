"""The page's Cost tab without the page: one gradient per strategy on the embedded digits model, its time and
memory and the sweep over N, by ``sdo bench`` itself in a process of its own (:class:`~sdo.ui.jobs.CommandJob`: its
code, its checks and one-line messages, its files), and what its folder holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CostRequest", "bench_command", "read_bench"]


@dataclass
class CostRequest:
    """``strategies`` timed on one latent gradient through ``steps`` DDIM steps of batch ``batch``, and again at each
    N of ``sweep``."""

    strategies: list[str] = field(default_factory=lambda: ["sdo", "full", "adjoint"])
    steps: int = 20
    sweep: str = "5,10,20"
    batch: int = 2


def bench_command(req: CostRequest, output: Path) -> list[str]:
    """The ``sdo bench`` arguments of ``req`` into ``output``: the latent rows only, one timed round, no quality or
    fidelity section (the page's quick view; ``sdo bench`` itself checks every value)."""
    return ["bench", "--strategies", ",".join(req.strategies) or "none", "--steps", str(req.steps), "--sweep",
            str(req.sweep), "--batch", str(req.batch), "--repeats", "1", "--no-params", "--no-fidelity",
            "--guidance-scales", "none", "--quality-iterations", "0", "--output", str(output), "--no-progress"]


def read_bench(folder: str | Path) -> dict:
    """``table`` (bench.md's text) and ``images`` (its cost and sweep plots, those that exist) of a bench folder."""
    folder = Path(folder)
    images = [folder / name for name in ("cost.png", "sweep_time.png", "sweep_memory.png") if (folder / name).is_file()]
    table = (folder / "bench.md").read_text() if (folder / "bench.md").is_file() else ""
    return {"table": table, "images": images}
