"""The page's Adversarial tab without the page: the attack of Sec. 5.1.4, per method, success with its 95% Wilson
interval, the change, the seconds.

- On the embedded digits: class-conditional samples, with the benchmark's fair step rules (each method at its own
  tuned learning rate, :data:`sdo.recipes.attack.TUNED_LR`), from the same correctly read samples
  (:func:`sdo.recipes.attack.attack`).
- On a local pipeline and image classifier (``sdo ui --model --classifier``): ``sdo adversarial`` itself
  (:func:`sdo.recipes.latent_tasks.adversarial`) on the generations of ``samples`` seeds of one prompt, every method
  at the same learning rate (the paper's 0.1 by default), each writing the folder the command writes."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checks import UsageError, check_int, check_number, check_text

__all__ = ["AttackRequest", "check_attack", "run_attack"]


@dataclass
class AttackRequest:
    """``methods`` (of :data:`sdo.recipes.attack.METHODS`) attacking ``samples`` correctly read samples under
    ``rule`` ("plain" or "sign"), ``iterations`` steps in an L-infinity ball of radius ``tau`` around x_T, sampled in
    ``steps`` steps. On a pipeline: the generations of ``prompt`` from seeds ``seed``, ``seed + 1``, ... at one
    ``lr`` for every method (default 0.1, the paper's); on the digits each method has its tuned lr."""

    methods: list[str] = field(default_factory=lambda: ["sdo", "full"])
    rule: str = "plain"
    samples: int = 8
    steps: int = 30
    iterations: int = 30
    tau: float = 0.1
    seed: int = 0
    prompt: str | None = None
    lr: float | None = None


def check_attack(req: AttackRequest, pipeline: bool = False) -> None:
    """Every option, before any work, with the command line's one-line messages; ``pipeline``: the attack of a
    local pipeline's generations (a prompt is needed; one lr for every method)."""
    from ..recipes.attack import METHODS

    if pipeline:
        check_text("prompt", req.prompt)
        if req.lr is not None:
            check_number("lr", req.lr, above=0)
    elif req.prompt is not None or req.lr is not None:
        raise UsageError("the digits attack samples each class and runs each method at its tuned lr: no prompt or "
                         "lr (those are for a pipeline: sdo ui --model --classifier)",
                         "prompt" if req.lr is None else "lr")
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
               stop: threading.Event | None = None, device: str = "cpu", pipeline: tuple | None = None) -> list[dict]:
    """Each method's attack into ``out`` (``results.json``; ``samples.png``: the originals, then per method its
    reported samples and their change x5); ``report`` gets ``{"method", "iteration", "loss"}`` per iteration and
    ``{"method", "done": row}`` after each; a set ``stop`` ends the current method and skips the rest. Returns the
    rows of the methods that finished, with their reported samples. ``pipeline``: ``(pipe, classifier)`` of a
    local pipeline and image classifier (``sdo adversarial --model --classifier`` per seed, each into
    ``out/<method>/seed-<seed>/``; the iterations of the seeds are counted one after another)."""
    from ..recipes.attack import TUNED_LR, attack, correct_samples
    from .edit import embedded_models

    check_attack(req, pipeline is not None)
    stop = stop or threading.Event()
    if pipeline is not None:
        return _attack_pipeline(req, out, report, stop, *pipeline)
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
    return _finish(req, out, report, stop, rows, grid)


def _attack_pipeline(req: AttackRequest, out: Path, report, stop: threading.Event, pipe, classifier) -> list[dict]:
    """:func:`run_attack` on a pipeline's generations: ``sdo adversarial`` on each seed, per method."""
    from ..gradients import get_strategy
    from ..recipes.attack import METHODS, wilson
    from ..recipes.latent_tasks import adversarial

    lr = 0.1 if req.lr is None else req.lr
    seeds = range(req.seed, req.seed + req.samples)
    rows, grid = [], []
    for method in req.methods:
        name, options = METHODS[method]
        results = []
        for n, seed in enumerate(seeds):
            if stop.is_set():
                break

            def callback(iteration, x0, loss, method=method, n=n):
                report({"method": method, "iteration": n * req.iterations + iteration, "loss": float(loss.mean())})
                return stop.is_set()

            result = adversarial(pipe, classifier, req.prompt, tau=req.tau, steps=req.steps, iterations=req.iterations,
                                 strategy=get_strategy(name, **options), lr=lr, step_rule=req.rule, seed=seed,
                                 progress=False, callback=callback)
            if stop.is_set():
                break
            settings = {"strategy": method, "steps": req.steps, "iterations": req.iterations, "lr": lr,
                        "optimizer": "sgd", "step_rule": req.rule, "tau": req.tau, "seed": seed}
            folder = out / method / f"seed-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            result.save(folder, "adversarial", req.prompt, method, settings)
            results.append(result)
        if stop.is_set():
            break
        before = torch.cat([r.before for r in results]).clamp(-1, 1)
        after = torch.cat([r.after for r in results]).clamp(-1, 1)
        success = [bool(r.metrics["success"][0]) for r in results]
        low, high = wilson(sum(success), len(success))
        row = {"method": method, "rule": req.rule, "lr": lr, "success": sum(success) / len(success),
               "interval": [low, high], "change": float((after - before).abs().mean()),
               "seconds": sum(r.optimization.seconds for r in results),
               "losses": [r.optimization.losses for r in results],
               "labels_before": [r.metrics["label_before"][0] for r in results],
               "labels_after": [r.metrics["label_after"][0] for r in results]}
        rows.append({**row, "reported": after, "originals": before})
        grid += [("original", before)] if not grid else []
        grid += [(method, after), (f"{method}: change x5", (5 * (after - before)).clamp(-1, 1))]
        report({"method": method, "done": row})
    return _finish(req, out, report, stop, rows, grid)


def _finish(req: AttackRequest, out: Path, report, stop: threading.Event, rows: list[dict], grid: list) -> list[dict]:
    """The run's ``samples.png`` and ``results.json`` (none once stopped: ``{"cancelled": True}``); its rows."""
    from .. import report as figures

    if stop.is_set():
        report({"cancelled": True})
        return rows
    out.mkdir(parents=True, exist_ok=True)
    figures.save_grid(grid, out / "samples.png", title=f"attack, {req.rule} steps, tau {req.tau}")
    keep = [{k: v for k, v in r.items() if not torch.is_tensor(v)} for r in rows]
    (out / "results.json").write_text(json.dumps({"request": asdict(req), "results": keep}, indent=2) + "\n")
    return rows
