"""The page's Fine-tune tab without the page: a short reward fine-tuning run of the embedded digits model toward a
digit, or of a local pipeline over prompts on the CLIP score (``sdo ui --model --clip``), run as ``sdo finetune``
itself in a process of its own (:class:`~sdo.ui.jobs.CommandJob`: the command's code and files; a checkpoint after
every update, so that stopping keeps the last one), and what a run folder holds, read while it trains or after."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..checks import UsageError, check_int, check_text
from ..finetuning.config import FinetuneConfig, methods
from ..finetuning.results import read_metrics, run_files

__all__ = ["PIPELINE_COUNTS", "TARGET_MODULES", "TuneRequest", "read_run", "tune_command"]

TARGET_MODULES = "to_q,to_k,to_v,to_out.0,conv1,conv2"  # the digits runs of docs/finetune.md
# a pipeline run's samples per grid, per guard check and per final evaluation (at the base and the tuned LoRA): a
# quick look, each sample being a full generation (the command's defaults are 16, 64 and 64 at three scales)
PIPELINE_COUNTS = ("--sample-count", "4", "--guard-count", "8", "--eval-count", "8", "--eval-scales", "0,1")


@dataclass
class TuneRequest:
    """A short run: ``method`` (any ``sdo finetune --strategy``), the ``target`` digit, the DRaFT+ penalty weight
    ``regularizer``, ``seconds`` of updates, ``lr``, and a grid of fixed-seed samples every ``sample_every``
    updates. On a pipeline: ``prompts`` (separated by ``|``) instead of the ``target``, and the sampler's
    ``steps`` and the ``batch_size`` (default: the command's)."""

    method: str = "sdo"
    target: int | None = 3
    regularizer: float = 30.0
    seconds: float = 60.0
    lr: float = 3e-3
    sample_every: int = 5
    prompts: str | None = None
    steps: int | None = None
    batch_size: int | None = None


def tune_command(req: TuneRequest, output: Path, model: str | None = None, clip: str | None = None,
                 device: str = "cpu") -> list[str]:
    """The ``sdo finetune`` arguments of ``req`` into the new folder ``output``, every option checked first (the
    command line's messages: :class:`~sdo.FinetuneConfig` checks them). ``model`` and ``clip``: a local pipeline
    tuned over ``req.prompts`` on the CLIP score (``--reward clip``) instead of the embedded digits. ``device``: a CPU
    keeps the run on the CPU (``--cpu``); otherwise the command takes the GPU it sees."""
    if req.method not in methods():
        raise UsageError(f"unknown method {req.method!r}; use one of {', '.join(methods())}", "strategy")
    sizes = {k: v for k, v in (("steps", req.steps), ("batch_size", req.batch_size)) if v is not None}
    FinetuneConfig(output=output, strategy=req.method, regularizer=req.regularizer, time_budget=req.seconds,
                   lr=req.lr, sample_every=req.sample_every, **sizes)
    if model is None:
        if req.prompts is not None:
            raise UsageError("prompts are for a pipeline (sdo ui --model --clip); the digits are tuned toward a "
                             "target digit", "prompts")
        check_int("target", req.target, minimum=0, maximum=9)
        task = ["--target", str(int(req.target)), "--target-modules", TARGET_MODULES, "--sample-count", "8"]
    else:
        prompts = [p.strip() for p in check_text("prompts", req.prompts).split("|")]
        for prompt in prompts:
            check_text("prompts", prompt)  # "a cat||a dog" holds an empty prompt
        task = ["--model", str(model), "--prompts", "|".join(prompts), "--reward", "clip", "--clip", str(clip),
                *PIPELINE_COUNTS]
    return ["finetune", "--output", str(output), "--strategy", req.method, *task,
            *(a for k, v in sizes.items() for a in (f"--{k.replace('_', '-')}", str(int(v)))),
            "--regularizer", repr(float(req.regularizer)), "--time-budget", repr(float(req.seconds)),
            "--updates", "100000", "--lr", repr(float(req.lr)), "--checkpoint-every", "1",
            "--sample-every", str(int(req.sample_every)), *(["--cpu"] if str(device).startswith("cpu") else []),
            "--no-progress"]


def read_run(folder: str | Path) -> dict:
    """What a run folder holds so far: ``records`` (``metrics.jsonl``), ``samples`` (the latest fixed-seed grid, or
    None), ``guard`` (the latest hacking-guard check, or None), ``summary`` (``summary.json`` once the run ended)
    and ``checkpoint`` (whether one is kept). A folder that is not a run is a :class:`~sdo.UsageError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such run folder", "folder")
    if not run_files(folder):
        raise UsageError(f"{folder} holds no sdo finetune run (no checkpoints, metrics.jsonl, config.json, "
                         "summary.json or lora)", "folder")
    records = read_metrics(folder / "metrics.jsonl", sys.maxsize)  # all of them; a line being written is dropped
    grids = sorted((folder / "samples").glob("step-*.png")) if (folder / "samples").is_dir() else []
    summary = folder / "summary.json"
    guard = next((r["guard"] for r in reversed(records) if "guard" in r), None)
    return {"records": records, "samples": grids[-1] if grids else None, "guard": guard,
            "summary": json.loads(summary.read_text()) if summary.is_file() else None,
            "final": folder / "final.png" if (folder / "final.png").is_file() else None,
            "checkpoint": (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())}
