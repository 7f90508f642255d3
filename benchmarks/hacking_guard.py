"""Does fine-tuning reward-hack? ShortFT and SDO toward every digit at the README's settings, read by the judge.

Each run tunes the unconditional digits DDPM (N = 50 DDIM steps) with a LoRA on the classifier's log p(target | x0),
with DRaFT+'s penalty (``--regularizer`` W: 10 for every digit 0-9, 30 for three of them), lr 3e-3, LoRA rank 4 on
attention and conv1/conv2, batch 8, seed 0, ``--budget`` seconds of updates, the hacking guard checking every 10
updates on 64 fixed seeds (sdo.finetuning.guard; ShortFT also checks each stage's LoRA before freezing it). Then
``--eval-count`` (256) fixed-seed samples at LoRA scale 1, other samples than the guard's 64, are read by the judge (a
k-NN on the real digits that was not the reward): its target rate, its rejection rate ("no digit") and the samples'
diversity (mean pairwise RMS distance, over the base model's), for the final LoRA and for the one the guard keeps.

    python benchmarks/hacking_guard.py                   # 26 runs of 120 s of updates: about 75 minutes
    python benchmarks/hacking_guard.py --methods shortft --output benchmarks/results/hacking_guard_held
    python benchmarks/hacking_guard.py --budget 10 --digits 7 --strong '' --output /tmp/quick
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

from sdo.recipes.attack import wilson
from sdo.finetuning import FinetuneConfig, finetune
from sdo.recipes.finetune_tasks import digits_task

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of updates per run (default 120)")
    parser.add_argument("--digits", type=_ints, default=list(range(10)), help="targets at W = --weak (default 0-9)")
    parser.add_argument("--strong", type=_ints, default=[3, 5, 8], help="targets also run at W = 30 (default 3,5,8)")
    parser.add_argument("--weak", type=float, default=10.0)
    parser.add_argument("--methods", default="shortft,sdo")
    parser.add_argument("--eval-count", type=int, default=256, help="judged samples per LoRA (default 256)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "hacking_guard")
    parser.add_argument("--force", action="store_true", help="replace the output's results and runs")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite results.md from results.json and runs/")
    args = parser.parse_args()
    if args.rewrite:
        results = json.loads((args.output / "results.json").read_text())
        for row in results:
            row.setdefault("seconds_by_stage", _stage_seconds(_folder(args.output, row)))
        (args.output / "results.json").write_text(json.dumps(results, indent=1))
        _write_table(args, results, None)
        return
    if (args.output / "results.json").exists() and not args.force:
        raise SystemExit(f"{args.output} already holds results; pass --force to replace them")
    shutil.rmtree(args.output / "runs", ignore_errors=True)
    args.output.mkdir(parents=True, exist_ok=True)
    plan = [(w, d, m) for w, digits in ((args.weak, args.digits), (30.0, args.strong)) for d in digits
            for m in args.methods.split(",")]
    results, started = [], time.time()
    for w, digit, method in plan:
        folder = _folder(args.output, {"method": method, "target": digit, "W": w})
        cfg = FinetuneConfig(output=folder, strategy=method, regularizer=w, lr=3e-3, time_budget=args.budget,
                             updates=100_000, target_modules=TARGETS, sample_every=0, eval_scales=(0.0, 1.0),
                             eval_count=args.eval_count, progress=False)
        result = finetune(digits_task("class", target=digit), cfg)
        summary = json.loads((folder / "summary.json").read_text())
        base, final = result.evaluation["0"], result.evaluation["1"]
        kept = summary["kept"]["evaluation"] if summary["kept"] else final
        row = {"method": method, "target": digit, "W": w, "updates": result.updates, "seconds": result.seconds,
               "base": base, "final": final, "kept": kept, "kept_update": result.kept_update,
               "guard_failed": summary["guard"]["failed"], "judged": args.eval_count,
               "seconds_by_stage": _stage_seconds(folder)}
        results.append(row)
        print(f"{method:8s} digit {digit} W={w:g}: final judge {final['judge_target']:.2f} rejected "
              f"{final['judge_rejected']:.2f} diversity {final['diversity'] / base['diversity']:.2f}; kept update "
              f"{result.kept_update} of {result.updates}", flush=True)
        (args.output / "results.json").write_text(json.dumps(results, indent=1))
    _write_table(args, results, time.time() - started)


def _folder(output: Path, row: dict) -> Path:
    return output / "runs" / f"{row['method']}-d{row['target']}-w{row['W']:g}"


def _stage_seconds(folder: Path) -> dict[str, float] | None:
    """ShortFT: the median seconds of an update at each progressive stage (from the run's metrics.jsonl)."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    stages = sorted({r["stage"] for r in records if "stage" in r})
    return {str(k): statistics.median(r["seconds"] for r in records if r.get("stage") == k) for k in stages} or None


def _with_interval(share: float, row: dict) -> str:
    """A judged share with its 95% Wilson interval over the row's judged samples."""
    n = row.get("judged", 64)
    low, high = wilson(round(share * n), n)
    return f"{share:.2f} [{low:.2f}, {high:.2f}]"


def _write_table(args, results: list[dict], seconds: float | None) -> None:
    head = ("| method | digit | W | updates | final: judge target | rejected [95%] | diversity | guard failed at | "
            "kept update | kept: judge target | rejected | diversity |")
    lines = [head, "| " + " | ".join(["---"] * 12) + " |"]
    for r in results:
        div = r["base"]["diversity"]
        lines.append(f"| {r['method']} | {r['target']} | {r['W']:g} | {r['updates']} "
                     f"| {r['final']['judge_target']:.2f} | {_with_interval(r['final']['judge_rejected'], r)} "
                     f"| {r['final']['diversity'] / div:.2f} | {', '.join(map(str, r['guard_failed'])) or '-'} "
                     f"| {r['kept_update']} "
                     f"| {r['kept']['judge_target']:.2f} | {r['kept']['judge_rejected']:.2f} "
                     f"| {r['kept']['diversity'] / div:.2f} |")
    for method in args.methods.split(","):
        rows = [r for r in results if r["method"] == method]
        if rows:
            worst = max(r["final"]["judge_rejected"] for r in rows)
            low = min(r["final"]["judge_target"] for r in rows)
            lines.append(f"\n{method}: over {len(rows)} runs, the highest final rejection rate is {worst:.2f} and the "
                         f"lowest final target rate {low:.2f}.")
    staged = [r["seconds_by_stage"] for r in results if r.get("seconds_by_stage")]
    if staged:
        keys = sorted({k for s in staged for k in s}, key=int)
        lines.append("\nShortFT, median seconds per update by stage over its runs: " + ", ".join(
            f"stage {k}: {statistics.median(s[k] for s in staged if k in s):.2f}" for k in keys) + ".")
    judged = results[0].get("judged", 64) if results else args.eval_count  # results before 256 judged the guard's 64
    same = "the guard's 64" if judged == 64 else "other samples than the guard's 64"
    took = "" if seconds is None else f"; {seconds / 60:.0f} min in all"
    command = "python benchmarks/hacking_guard.py"
    if args.methods != "shortft,sdo":
        command += f" --methods {args.methods}"
    if args.output.resolve() != (Path(__file__).parent / "results" / "hacking_guard").resolve():
        command += f" --output {args.output}"
    text = (f"# Reward hacking at the README's settings\n\n`{command}` ({args.budget:g} s of "
            f"updates per run{took} on {platform.machine()}). Judge on "
            f"{judged} fixed-seed samples at LoRA scale 1 ({same}); diversity over the base model's; 'kept': the "
            "LoRA of the last guard check that passed (the final one when every check passed).\n\n"
            + "\n".join(lines) + "\n")
    (args.output / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
