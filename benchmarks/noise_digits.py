"""Noise optimization on the embedded digits model: plain latent optimization (SDO's one-call gradient, and full
backpropagation) against ReNO's norm prior and DNO's probability regularizer (issue #20).

The unconditional digits DDPM at 10 DDIM steps; 8 initial noises per seed, each optimized with Adam (lr 0.05, 30
iterations, the same for every setting) to raise the classifier's log p(3 | x0). The judge (a k-NN on the real
digits that was not the reward) reads the best sample of each noise: how often it sees a 3, how often no digit at
all (reward hacking); the noise statistics say how far the noise left the Gaussian shell (|z| / sqrt(d), about 1 for
a draw; DNO's and ReNO's penalties at weight 1, 0 for a typical draw).

    python benchmarks/noise_digits.py --output benchmarks/results/noise_digits      # about 5 minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from sdo import report
from sdo.embedded import load_digits
from sdo.embedded.judge import DigitJudge
from sdo.recipes.attack import wilson
from sdo.recipes.noise import optimize_noise_digits

SETTINGS = {  # name -> (strategy, regularizer, its weight)
    "sdo": ("sdo", "none", None),
    "full": ("full", "none", None),
    "full + ReNO prior (0.01)": ("full", "reno", 0.01),
    "full + DNO regularizer (1)": ("full", "dno", 1.0),
    "sdo + DNO regularizer (1)": ("sdo", "dno", 1.0),
    "full + ReNO prior (1)": ("full", "reno", 1.0),
}


def _wilson(successes: int, n: int) -> str:
    low, high = wilson(successes, n)
    return f"{successes / n:.2f} [{low:.2f}, {high:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "noise_digits")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    models, judge = load_digits(), DigitJudge()
    results, curves, grids = {}, {}, []
    for name, (strategy, regularizer, weight) in SETTINGS.items():
        runs = []
        for seed in range(args.seeds):
            start = time.perf_counter()
            r = optimize_noise_digits("class", 3, count=args.count, steps=args.steps, regularizer=regularizer,
                                      weight=weight, iterations=args.iterations, lr=args.lr, strategy=strategy,
                                      seed=seed, models=models, judge=judge, progress=False)
            runs.append({**r.metrics, "seconds": time.perf_counter() - start, "losses": r.optimization.losses})
            if seed == 0:
                if not grids:
                    grids.append(("before", r.before))
                grids.append((name, r.after))
        results[name] = runs
        curves[name] = [statistics.fmean(run["losses"][i] for run in runs) for i in range(args.iterations)]
        print(name, "done", flush=True)
    _report(args, results, curves, grids)


def _report(args, results: dict, curves: dict, grids: list) -> None:
    n = args.seeds * args.count
    before = next(iter(results.values()))
    rows = [["before (every setting starts here)",
             report.mean_interval([statistics.fmean(r["reward_before"]) for r in before]),
             _wilson(round(sum(r["judge_target_before"] for r in before) * args.count), n),
             _wilson(round(sum(r["judge_rejected_before"] for r in before) * args.count), n),
             report.mean_interval([statistics.fmean(r["norm_ratio_before"]) for r in before]),
             report.mean_interval([statistics.fmean(r["dno_penalty_before"]) for r in before]), "-"]]
    for name, runs in results.items():
        rows.append([name, report.mean_interval([statistics.fmean(r["reward_after"]) for r in runs]),
                     _wilson(round(sum(r["judge_target_after"] for r in runs) * args.count), n),
                     _wilson(round(sum(r["judge_rejected_after"] for r in runs) * args.count), n),
                     report.mean_interval([statistics.fmean(r["norm_ratio_after"]) for r in runs]),
                     report.mean_interval([statistics.fmean(r["dno_penalty_after"]) for r in runs]),
                     f"{statistics.fmean(r['seconds'] for r in runs):.1f}"])
    header = ["setting", "reward log p(3)", "judge: 3", "judge: no digit", "|z| / sqrt(d)", "DNO penalty (w=1)",
              "s per seed"]
    table = report.format_table(header, rows)
    report.plot_curves({k: [-v for v in c] for k, c in curves.items()}, args.output / "reward_curves.png",
                       "noise optimization on the digits (mean over seeds)", "iteration", "log p(3 | x0)")
    report.save_grid(grids, args.output / "samples.png", title="seed 0: before, then each setting's best samples")
    text = (f"# Noise optimization on the embedded digits model\n\n`python benchmarks/noise_digits.py --seeds "
            f"{args.seeds} --count {args.count} --iterations {args.iterations} --lr {args.lr:g} --steps {args.steps} "
            f"--output {args.output}`\n\n{args.seeds} seeds x {args.count} noises = {n} samples per setting; the "
            f"unconditional digits DDPM at {args.steps} DDIM steps, Adam lr {args.lr:g} for {args.iterations} "
            "iterations on log p(3 | x0); each noise's best sample. Means with 95% t-intervals over the seeds; "
            "the judge's shares with 95% Wilson intervals over the samples.\n\n"
            f"{table}\n\nMachine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads.\n")
    (args.output / "results.md").write_text(text)
    (args.output / "results.json").write_text(json.dumps({"args": vars(args) | {"output": str(args.output)},
                                                          "results": results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
