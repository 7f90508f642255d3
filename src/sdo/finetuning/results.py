"""What a fine-tuning run writes besides its checkpoints: the metrics log (``metrics.jsonl``, which survives a
kill), the reward curve, the final evaluation per LoRA scale and ``summary.json``. ``run`` is a
:class:`~sdo.finetuning.trainer.TrainingRun`."""

from __future__ import annotations

import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

from .. import report
from ..checks import UsageError
from .checkpoints import atomic_write
from .guard import GuardCheck

__all__ = ["evaluate", "finish", "keep_folder", "plot_rewards", "read_metrics", "run_files", "warn_hacking",
           "write_metrics"]


def run_files(output) -> list[str]:
    """What of a fine-tuning run ``output`` holds (any of these marks a run folder, even with its checkpoints pruned):
    the names of its checkpoints, logs, settings, summary and LoRA that exist there."""
    out = Path(output)
    return [name for name in ("checkpoints", "metrics.jsonl", "config.json", "summary.json", "lora", "kept")
            if (out / name).exists()]


def read_metrics(path: Path, upto: int) -> list[dict]:
    """The records of ``path`` up to update ``upto``. A partial last line (a kill while writing it, or a run still
    writing it) is dropped with a warning; any other line that is not a record is a :class:`UsageError`."""
    if not path.is_file():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if n == lines[-1][0]:
                warnings.warn(f"{path}, line {n}: dropped a partial record (a run killed while writing it, or "
                              "still writing it)", stacklevel=2)
                continue
            raise UsageError(f"{path}, line {n}: not a JSON record ({error.msg}); fix or delete the line") from None
        if not isinstance(record, dict) or not isinstance(record.get("update"), int):
            raise UsageError(f"{path}, line {n}: not a metrics record (no update number)")
        records.append(record)
    return [r for r in records if r["update"] <= upto]


def write_metrics(path: Path, records: list[dict]) -> None:
    """``records`` as ``path`` (one JSON record per line), atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))


def warn_hacking(run, check: GuardCheck, bar, stop: bool) -> None:
    """A failed guard check, said on stderr above the progress bar (main process only)."""
    if run.acc.is_main_process:
        then = ("stopping (stop_on_hacking)" if stop else
                f"continuing (stop_on_hacking stops after {run.cfg.guard_patience} failed checks in a row)")
        bar.write(f"WARNING: reward hacking suspected at update {check.update}: {'; '.join(check.failed)}. The samples "
                  f"are leaving the base model's distribution; the LoRA to keep is update {run.kept[0]}'s, the last "
                  f"check that passed; {then}", file=sys.stderr)


def keep_folder(run) -> str:
    """Where the LoRA a user should keep lies: the final one (``lora``), or the last that passed the guard."""
    return "." if run.kept is None or run.kept[0] == run.step else "kept"


def plot_rewards(out: Path, metrics: list[dict], label: str) -> None:
    """``reward.png``: the mean reward of each update against the seconds spent in updates."""
    kept = [r for r in metrics if not r["skipped"]]
    if kept:
        report.plot_curves({label: [r["reward_mean"] for r in kept]}, out / "reward.png", "reward during fine-tuning",
                           "seconds in updates", "mean reward of the batch", x=[r["elapsed"] for r in kept])


def finish(run, metrics: list[dict]) -> dict:
    """Save the LoRA (and the one the guard keeps, when that is not the final one), check the ranks agree, score
    final samples per LoRA scale, draw the curves, write ``summary.json``."""
    cfg, acc, out = run.cfg, run.acc, run.cfg.output
    flat = torch.cat([p.detach().flatten() for p in run.method.params]).to(acc.device)
    spread = float((acc.gather(flat[None]) - flat[None]).abs().max()) if acc.num_processes > 1 else 0.0
    evaluation, rows, kept = {}, [], None
    if acc.is_main_process:
        run.method.save(out / "lora")
        for scale in cfg.eval_scales:
            evaluation[f"{scale:g}"] = evaluate(run, scale)
            # the grid's own fixed-seed draw of sample_count (the first rows of a larger draw are other samples)
            rows.append((f"LoRA x{scale:g}", *run.fixed_samples(cfg.sample_count, scale)))
        if keep_folder(run) != ".":  # the guard's LoRA: saved, scored at scale 1 and shown, then the final restored
            final = run.method.copy()
            run.method.load(run.kept[1], out / "kept")
            run.method.save(out / "kept" / "lora")
            kept = {"update": run.kept[0], "evaluation": evaluate(run, 1.0)}
            rows.append((f"kept: update {run.kept[0]}", *run.fixed_samples(cfg.sample_count, 1.0)))
            run.method.load(final, out)
        run.grid(out / "final.png", rows)
        plot_rewards(out, metrics, cfg.strategy)
        checks = [r[k] for r in metrics for k in ("stage_check", "guard") if k in r]  # ShortFT checks stage ends
        summary = {"updates": run.step, "skipped": run.skipped, "seconds": run.seconds, "processes": acc.num_processes,
                   "rank_max_abs_diff": spread, "evaluation": evaluation,
                   "seconds_per_update": statistics.median([r["seconds"] for r in metrics]) if metrics else None,
                   "keep": str(Path(keep_folder(run)) / "lora") if cfg.guard_every else None, "kept": kept,
                   "guard": {"checks": checks, "failed": [c["update"] for c in checks if c["failed"]]}}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    acc.wait_for_everyone()
    return evaluation


def evaluate(run, scale: float) -> dict:
    """The reward and the task's judge on ``eval_count`` fixed-seed samples at LoRA ``scale``."""
    images, conditions = run.fixed_samples(run.cfg.eval_count, scale)
    with torch.no_grad():
        reward = run.task.reward(images, conditions).float()
    entry = {"reward_mean": float(reward.mean()), "reward_std": float(reward.std()) if len(reward) > 1 else 0.0}
    return {**entry, **(run.task.describe(images, conditions) if run.task.describe else {})}
