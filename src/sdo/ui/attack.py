"""The page's Adversarial tab without the page: the attack of Sec. 5.1.4 on class-conditional samples of the
embedded digits model, per method with the benchmark's fair step rules (each method at its own tuned learning rate,
:data:`sdo.recipes.attack.TUNED_LR`), from the same correctly read samples (:func:`sdo.recipes.attack.attack`);
success with its 95% Wilson interval, the change, the seconds."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checks import UsageError, check_int, check_number

__all__ = ["AttackRequest", "check_attack", "run_attack"]


@dataclass
class AttackRequest:
    """``methods`` (of :data:`sdo.recipes.attack.METHODS`) attacking ``samples`` correctly read samples under
    ``rule`` ("plain" or "sign"), ``iterations`` steps in an L-infinity ball of radius ``tau`` around x_T."""

    methods: list[str] = field(default_factory=lambda: ["sdo", "full"])
    rule: str = "plain"
    samples: int = 8
    steps: int = 30
    iterations: int = 30
    tau: float = 0.1
    seed: int = 0


def check_attack(req: AttackRequest) -> None:
    from ..recipes.attack import METHODS

    if not req.methods:
        raise UsageError("choose at least one method", "methods")
    for method in req.methods:
        if method not in METHODS:
            raise UsageError(f"unknown method {method!r}; use one of {', '.join(METHODS)}", "methods")
    if req.rule not in ("plain", "sign"):
        raise UsageError(f"rule must be 'plain' or 'sign', got {req.rule!r}", "rule")
    check_int("samples", req.samples, minimum=1, maximum=100)
    check_int("steps", req.steps, minimum=1)
    check_int("iterations", req.iterations, minimum=1)
    check_number("tau", req.tau, above=0)
    check_int("seed", req.seed, minimum=0)


def run_attack(req: AttackRequest, out: Path, report: Callable[[dict], None] = lambda event: None,
               stop: threading.Event | None = None, device: str = "cpu") -> list[dict]:
    """Each method's attack into ``out`` (``results.json``; ``samples.png``: the originals, then per method its
    reported samples and their change x5); ``report`` gets ``{"method", "iteration", "loss"}`` per iteration and
    ``{"method", "done": row}`` after each; a set ``stop`` ends the current method and skips the rest. Returns the
    rows of the methods that finished, with their reported samples."""
    from .. import report as figures
    from ..recipes.attack import TUNED_LR, attack, correct_samples
    from .edit import embedded_models

    check_attack(req)
    stop = stop or threading.Event()
    models = embedded_models(device)[0]
    labels, x_T, originals = correct_samples(models, req.samples, req.steps, req.seed, device)
    rows, grid = [], [("original", originals)]
    for method in req.methods:
        if stop.is_set():
            break

        def callback(iteration, loss, method=method):
            report({"method": method, "iteration": iteration, "loss": loss})
            return stop.is_set()

        lr = TUNED_LR[(method, req.rule)]
        run, reported = attack(models, labels, x_T, originals, method, req.rule, lr, steps=req.steps,
                               iterations=req.iterations, tau=req.tau, return_samples=True, callback=callback)
        if stop.is_set():
            break
        low, high = run.interval()
        row = {"method": method, "rule": req.rule, "lr": lr, "success": run.rate, "interval": [low, high],
               "change": run.change, "seconds": run.seconds, "losses": run.losses}
        rows.append({**row, "reported": reported, "originals": originals})
        grid += [(method, reported), (f"{method}: change x5", (5 * (reported - originals.clamp(-1, 1))).clamp(-1, 1))]
        report({"method": method, "done": row})
    if stop.is_set():
        report({"cancelled": True})
        return rows
    out.mkdir(parents=True, exist_ok=True)
    figures.save_grid(grid, out / "samples.png", title=f"attack, {req.rule} steps, tau {req.tau}")
    keep = [{k: v for k, v in r.items() if not torch.is_tensor(v)} for r in rows]
    (out / "results.json").write_text(json.dumps({"request": asdict(req), "results": keep}, indent=2) + "\n")
    return rows
