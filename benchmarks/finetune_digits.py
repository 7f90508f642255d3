"""Reward fine-tuning on the embedded digits model at equal wall-clock: SDO and ShortFT against AlignProp-uniform,
AlignProp-1 / DRaFT-1, DRaFT-K and the cheap one- or few-call gradients ReFL, DRaFT-LV, DRTune and Direct-Align
(Sec. 5.2 of Dou et al., 2025; Guo et al., ICCV 2025; issue #20; on a model that runs on a CPU).

The unconditional digits DDPM (N = 50 DDIM steps) gets a LoRA trained to make the classifier read every sample
as a 3 (reward: log p(3 | x0)). Each method runs for the same seconds of updates, from the same seeds:

- ``sdo``: one denoiser call keeps its graph, at a step drawn uniformly per update (Eq. 20);
- ``alignprop-uniform``: the last k ~ U{1..50} calls keep graphs, recomputed in backward, as AlignProp runs;
- ``alignprop-1``: the last call only (DRaFT-1); ``draft-5``: the last 5 (DRaFT-K);
- ``shortft``: four stacked per-segment LoRAs trained end to end through the chain shortened by the shipped
  few-step student, in four progressive stages of a quarter of the budget each;
- ``refl``: no graph to a step of the last quarter, its one-step prediction scored, with ReFL's pre-training loss
  (weight 1, on the digits' training images); ``draft-lv``: DRaFT-1 on two re-noised copies of the sample;
  ``drtune``: 5 evenly spaced calls kept, every call's input gradient stopped; ``direct-align``: known noise
  injected at a step drawn over the whole chain, one step with its graph, the image recovered with that noise.

``--seeds S`` runs every method from S seeds (the LoRA's init, the batches' noise and the method's draws); the table
gives each figure's mean over the seeds with a 95% Student-t interval, and the plot every seed's curve.

``--variance-seeds S`` also measures, at the initial point (base model, fresh LoRAs), each method's LoRA gradient on
S independent batches: its spread across seeds (relative variance, tr Cov / |mean|^2) and how well its mean points
along the mean gradient of full backpropagation (cosine). For ShortFT it is the gradient of the first segment's
LoRA, which is active at every timestep like the single LoRA of the others.

Then 64 fixed-seed samples per method and LoRA scale are scored by the reward and read by the judge, a k-NN
on the real digits that was not the reward (a grey texture the classifier calls 3 is "no digit" to it).
Every method runs with DRaFT+'s penalty (``--regularizer``, default 30); SDO also runs without it, to show the
reward hacking that the judge catches.

    python benchmarks/finetune_digits.py                     # 4 runs of 300 s of updates: about 25 minutes
    python benchmarks/finetune_digits.py --budget 20 --output /tmp/quick
    python benchmarks/finetune_digits.py --methods shortft,sdo,draft-5,alignprop-uniform --unregularized '' \
        --variance-seeds 12 --output benchmarks/results/shortft_digits     # ShortFT's comparison: about 30 minutes
    python benchmarks/finetune_digits.py --budget 60 --seeds 4 --unregularized '' --variance-seeds 8 \
        --methods sdo,shortft,alignprop-1,draft-lv,refl,drtune,direct-align,alignprop-uniform \
        --output benchmarks/results/cheap_gradients                        # issue #20's comparison: about 50 minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from sdo import report
from sdo.finetuning import FinetuneConfig, finetune
from sdo.recipes.finetune_tasks import digits_task
from sdo.embedded.judge import DigitJudge

METHODS = {"sdo": dict(strategy="sdo"), "alignprop-uniform": dict(strategy="random-truncated"),
           "alignprop-1": dict(strategy="truncated", k=1), "draft-5": dict(strategy="truncated", k=5),
           "shortft": dict(strategy="shortft"), "full": dict(strategy="checkpoint"),
           "refl": dict(strategy="refl", pretrain_weight=1.0), "draft-lv": dict(strategy="draft-lv"),
           "drtune": dict(strategy="drtune"), "direct-align": dict(strategy="direct-align")}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


def _smooth(values: list[float], window: int = 5) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of updates per run (default 300)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "finetune_digits")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--regularizer", type=float, default=30.0, help="DRaFT+ weight of every method (default 30)")
    parser.add_argument("--unregularized", default="sdo", help="methods also run without the penalty ('' for none)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=1, help="runs per method, from seeds seed, seed+1, ...")
    parser.add_argument("--variance-seeds", type=int, default=0, help="batches of the gradient-variance study (0: none)")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    judge = DigitJudge()
    runs, curves, times = {}, {}, {}
    plan = [(m, args.regularizer) for m in args.methods.split(",")]
    plan += [(m, 0.0) for m in args.unregularized.split(",") if m]
    for method, reg in plan:
        name = method if reg == args.regularizer else f"{method} (no penalty)"
        runs[name], curves[name], times[name] = [], [], []
        for seed in range(args.seed, args.seed + args.seeds):
            slug = (method if reg == args.regularizer else f"{method}-no-penalty") + (f"-s{seed}" if args.seeds > 1
                                                                                       else "")
            folder = args.output / "runs" / slug
            cfg = _config(args, method, folder, reg, seed=seed)
            if folder.exists():  # a fresh run every time
                shutil.rmtree(folder)
            start = time.perf_counter()
            result = finetune(digits_task("class", target=3, judge=judge), cfg)
            kept = [m for m in result.metrics if not m["skipped"]]
            run = {
                "strategy": cfg.strategy, "k": cfg.k if cfg.strategy == "truncated" else None, "regularizer": reg,
                "seed": seed, "updates": result.updates, "skipped": result.skipped,
                "seconds_in_updates": result.seconds, "seconds_per_update": result.seconds_per_update,
                "final_train_reward": statistics.fmean(m["reward_mean"] for m in kept[-10:]),
                "evaluation": result.evaluation, "wall": time.perf_counter() - start,
            }
            stages = sorted({m["stage"] for m in kept if "stage" in m})
            if stages:  # ShortFT: the median seconds per update of each progressive stage
                run["seconds_per_update_by_stage"] = {
                    s: statistics.median(m["seconds"] for m in kept if m.get("stage") == s) for s in stages}
            if seed == args.seed:  # rows: LoRA x0, x0.5, x1
                shutil.copy(folder / "final.png", args.output / f"final_{slug.removesuffix(f'-s{seed}')}.png")
            runs[name].append(run)
            curves[name].append(_smooth([m["reward_mean"] for m in kept]))
            times[name].append([m["elapsed"] for m in kept])
            print(json.dumps({name: run}, indent=1), flush=True)
    variance = _variance(args, judge) if args.variance_seeds else {}
    _report(args, runs, curves, times, variance)


def _config(args, method: str, folder: Path, regularizer: float, **over) -> FinetuneConfig:
    values = dict(output=folder, **METHODS[method], steps=args.steps, updates=100_000, batch_size=args.batch,
                  lr=args.lr, rank=4, target_modules=TARGETS, regularizer=regularizer, time_budget=args.budget,
                  seed=args.seed, checkpoint_every=25, sample_every=0, eval_count=64, eval_scales=(0.0, 0.5, 1.0),
                  progress=False)
    return FinetuneConfig(**{**values, **over})


def _variance(args, judge) -> dict:
    """Each method's LoRA gradient at the initial point on ``variance_seeds`` batches (module docstring)."""
    from sdo.finetuning.lora import lora_parameters
    from sdo.finetuning.trainer import TrainingRun

    grads, seconds = {}, {}
    methods = ["full"] + [m for m in args.methods.split(",") if m != "full"]
    for method in methods:
        folder = args.output / "runs" / f"variance-{method}"
        shutil.rmtree(folder, ignore_errors=True)
        task = digits_task("class", target=3, judge=judge)
        cfg = _config(args, method, folder, args.regularizer, time_budget=None, pretrain_weight=0.0)  # the reward's
        run = TrainingRun(task, cfg)
        first = sum(p.numel() for p in lora_parameters(task.model, "segment_1" if cfg.strategy == "shortft" else "default"))
        rows, spent = [], []
        for s in range(args.variance_seeds):
            for i, gen in enumerate(run.generators.values()):
                gen.manual_seed(7_000 + 10 * s + i)
            start = time.perf_counter()
            grad = run.gradient()[0]
            spent.append(time.perf_counter() - start)
            run.optimizer.zero_grad(set_to_none=True)
            rows.append(grad[:first].double())
        grads[method], seconds[method] = torch.stack(rows), statistics.median(spent)
        print(f"variance: {method} done, {seconds[method]:.2f} s per gradient", flush=True)
    reference = grads["full"].mean(0)
    out = {}
    for method, g in grads.items():
        mean = g.mean(0)
        spread = float(((g - mean) ** 2).sum(1).mean() / mean.square().sum())
        cos = torch.nn.functional.cosine_similarity
        per_seed = cos(g, reference[None].expand_as(g), dim=1)
        out[method] = {"mean_norm": float(mean.norm()), "per_batch_norm": float(g.norm(dim=1).mean()),
                       "relative_variance": spread, "cosine_mean_to_full": float(cos(mean, reference, dim=0)),
                       "cosine_batch_to_full_mean": float(per_seed.mean()),
                       "cosine_batch_to_full_std": float(per_seed.std()), "seconds_per_gradient": seconds[method]}
    return out


def _cell(values: list[float], digits: int = 2) -> str:
    return report.mean_interval(values, digits)


def _report(args, runs: dict, curves: dict, times: dict, variance: dict) -> None:
    plt = report._pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for n, (name, seeds) in enumerate(curves.items()):
        for j, values in enumerate(seeds):
            ax.plot(times[name][j], values, color=f"C{n}", alpha=0.8, lw=1, label=name if j == 0 else None)
    ax.set(title="reward fine-tuning of the digits DDPM toward 3 (N=50)", xlabel="seconds of updates",
           ylabel="log p(3 | x0), mean of the last 5 updates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output / "reward_curves.png", dpi=110)
    plt.close(fig)
    reference = next((r for r in runs.values() if r[0]["strategy"] == "random-truncated"), None)
    rows = []
    for name, seeds in runs.items():
        tuned = [r["evaluation"]["1"] for r in seeds]
        speed = statistics.fmean(r["seconds_per_update"] for r in seeds)
        ratio = speed / statistics.fmean(r["seconds_per_update"] for r in reference) if reference else float("nan")
        rows.append([name, _cell([r["updates"] for r in seeds], 0), f"{speed:.2f}", f"{ratio:.2f}",
                     _cell([r["final_train_reward"] for r in seeds], 3), _cell([e["reward_mean"] for e in tuned], 3),
                     _cell([e["classifier_target"] for e in tuned]), _cell([e["judge_target"] for e in tuned]),
                     _cell([e["judge_rejected"] for e in tuned]),
                     _cell([r["evaluation"]["0.5"]["judge_target"] for r in seeds]),
                     _cell([e["diversity"] for e in tuned], 3)])
    base = next(iter(runs.values()))[0]["evaluation"]["0"]
    header = ["run", "updates", "s/update", "vs AlignProp-uniform", "train reward (last 10)", "eval reward",
              "classifier: 3", "judge: 3", "judge: no digit", "judge: 3 at LoRA x0.5", "diversity"]
    table = report.format_table(header, rows)
    seeds = f", seeds {args.seed}..{args.seed + args.seeds - 1} (mean ± 95% t-interval over them)" if args.seeds > 1 else ""
    text = (f"# Reward fine-tuning on the embedded digits model\n\n`python benchmarks/finetune_digits.py "
            f"--budget {args.budget:g} --methods {args.methods} --regularizer {args.regularizer:g} "
            f"--unregularized '{args.unregularized}' --output {args.output} --lr {args.lr:g} --batch {args.batch} "
            f"--steps {args.steps} --seed {args.seed} --seeds {args.seeds} --variance-seeds {args.variance_seeds}`"
            f"\n\n{args.budget:g} s of updates per run{seeds}, batch {args.batch}, N={args.steps}, LoRA rank 4 on "
            f"{', '.join(TARGETS)}; eval: 64 fixed-seed samples at LoRA scale 1 (diversity: their mean pairwise RMS "
            f"distance in pixels of [-1, 1]). The base model (LoRA x0): reward {base['reward_mean']:.3f}, classifier "
            f"reads 3 in {base['classifier_target']:.2f}, judge in {base['judge_target']:.2f}, diversity "
            f"{base['diversity']:.3f}.\n\n{table}\n\nMachine: {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads.\n")
    if variance:
        rows = [[m, f"{v['seconds_per_gradient']:.2f}", f"{v['per_batch_norm']:.3g}", f"{v['mean_norm']:.3g}",
                 f"{v['relative_variance']:.2f}", f"{v['cosine_mean_to_full']:.3f}",
                 f"{v['cosine_batch_to_full_mean']:.3f} ± {v['cosine_batch_to_full_std']:.3f}"] for m, v in variance.items()]
        header = ["method", "s/gradient", "|g| per batch", "|mean g|", "tr Cov / |mean|^2", "cos(mean, full mean)",
                  "cos(batch g, full mean)"]
        text += (f"\n## LoRA gradient across {args.variance_seeds} batches at the initial point\n\n"
                 f"{report.format_table(header, rows)}\n")
    (args.output / "results.md").write_text(text)
    (args.output / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                          "runs": runs, "variance": variance}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
