"""The cheap-gradient comparison of docs/methods.md on a local text-to-image pipeline (for a GPU): every method
fine-tunes the same LoRA for the same seconds of updates on the same prompts and reward, from the same seeds, through
``sdo finetune``; the final samples are scored by the reward and by a judge that was not the reward (``--judge``,
e.g. CLIP score when tuning on PickScore). One table (mean ± 95% t-interval over seeds) and the reward curves.

    python benchmarks/cheap_gradients_pipeline.py --model ./sd15 --prompts prompts.txt --reward pickscore \\
        --pickscore ./pickscore --judge clip --clip ./clip-vit-l14 --few-step ./sd15-hyper --budget 900 \\
        --seeds 3 --output results/cheap_gradients_sd15

``--few-step`` is ShortFT's few-step folder; without it ShortFT is left out. Every option after ``--`` goes to each
``sdo finetune`` run as it is (``-- --guidance-scale 7.5 --steps 50 --lr 1e-4``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sdo import report
from sdo.cli import main as sdo_main

METHODS = {"sdo": ["--strategy", "sdo"], "shortft": ["--strategy", "shortft"],
           "draft-1": ["--strategy", "truncated", "--k", "1"], "draft-lv": ["--strategy", "draft-lv"],
           "refl": ["--strategy", "refl"], "drtune": ["--strategy", "drtune"],
           "direct-align": ["--strategy", "direct-align"], "alignprop-uniform": ["--strategy", "random-truncated"]}


def _cell(values: list[float]) -> str:
    return report.mean_interval(values)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("model", "prompts", "reward", "judge", "output"):
        parser.add_argument(f"--{name}", required=True)
    for name in ("clip", "pickscore", "head", "few_step"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budget", type=float, default=900.0, help="seconds of updates per run (default 900)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m != "shortft" or args.few_step]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; use {', '.join(METHODS)}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    folders = [f"--{k.replace('_', '-')}={v}" for k in ("clip", "pickscore", "head") if (v := getattr(args, k))]
    runs: dict[str, list[dict]] = {}
    for method in methods:
        for seed in range(args.seeds):
            folder = out / "runs" / f"{method}-s{seed}"
            command = ["finetune", "--model", args.model, "--prompts", args.prompts, "--reward", args.reward,
                       "--judge", args.judge, *folders, *METHODS[method], "--seed", str(seed), "--updates", "1000000",
                       "--time-budget", str(args.budget), "--output", str(folder), "--no-progress", *extra]
            if method == "shortft":
                command += ["--few-step", args.few_step]
            if sdo_main(command) != 0:
                raise SystemExit(f"sdo {' '.join(command)} failed")
            summary = json.loads((folder / "summary.json").read_text())
            records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            runs.setdefault(method, []).append({"summary": summary, "curve": [
                (r["elapsed"], r["reward_mean"]) for r in records if not r["skipped"]]})
    _report(args, out, runs)


def _report(args, out: Path, runs: dict) -> None:
    rows = []
    for method, seeds in runs.items():
        tuned = [s["summary"]["evaluation"]["1"] for s in seeds]
        base = [s["summary"]["evaluation"]["0"] for s in seeds]
        rows.append([method, _cell([float(s["summary"]["updates"]) for s in seeds]),
                     _cell([e["reward_mean"] for e in base]), _cell([e["reward_mean"] for e in tuned]),
                     _cell([e["judge_reward"] for e in base]), _cell([e["judge_reward"] for e in tuned])])
    header = ["method", "updates", "reward, base", "reward, tuned", "judge, base", "judge, tuned"]
    table = report.format_table(header, rows)
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for n, (method, seeds) in enumerate(runs.items()):
        for j, s in enumerate(seeds):
            ax.plot(*zip(*s["curve"], strict=True), color=f"C{n}", lw=1, label=method if j == 0 else None)
    ax.set(title=f"reward {args.reward} during fine-tuning, every seed", xlabel="seconds of updates", ylabel="reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_curves.png", dpi=110)
    plt.close(fig)
    text = (f"# Cheap gradients on {args.model}\n\n`python benchmarks/cheap_gradients_pipeline.py "
            f"{' '.join(sys.argv[1:])}`\n\n{args.budget:g} s of updates per run, {args.seeds} seeds; reward "
            f"{args.reward}, judge {args.judge}; final samples at LoRA scales 0 (base) and 1 (tuned).\n\n{table}\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(runs, indent=1))
    print(text)


if __name__ == "__main__":
    main()
