"""The figures of docs/picard.md: Picard sampling (ParaDiGMS) and SDO on a Picard forward pass.

1. Sweeps and denoiser calls to converge against N and the window (cold start), with the sample's distance to
   the sequential one; at N = --steps, also against the tolerance.
2. Plain Picard iteration (every sweep over all steps), cold and warm-started: the distance to the fixed point
   after each sweep, the contraction the SDO paper's gradient bound rests on (its lambda).
3. Latent optimization (SDO, Adam): sweeps per iteration with and without warm start from the last trajectory,
   and how far the loss curve strays from sequential SDO's.
4. Wall time of one SDO gradient with a Picard forward pass (cold, and warm from a neighbouring latent's
   trajectory) against the sequential forward pass, on this machine's device.

Writes results.json, results.md, sweeps.png and convergence.png to benchmarks/results/picard/ (or ``--output``);
a run that names only some ``--parts`` keeps the others a previous run left there (``--fresh`` drops them).

    python benchmarks/picard.py                     # digits UNet on CPU, about 20 min on 2 cores
    python benchmarks/picard.py --quick --output /tmp/picard-smoke
    python benchmarks/picard.py --model benchmarks/configs/sd15_unet.json --device cuda --batch 1 \\
        --parts wall --output /tmp/picard-gpu      # SD-1.5-sized UNet with random weights, on a GPU
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import sdo
from sdo import report
from sdo.cli.bench import BenchConfig, build
from sdo.measure.profile import latent_gradient, time_jobs


def _csv(kind):
    return lambda text: tuple(kind(v) for v in text.split(",") if v)


def _distance(a, b) -> dict:
    """Max absolute and relative RMS distance between two samples."""
    diff = (a - b).double()
    return {"max_abs": float(diff.abs().max()), "rel_rms": float(diff.pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt())}


def sweeps_table(args, cfg) -> list[dict]:
    rows = []
    cases = [(n, w, args.tol) for n in args.steps_list for w in args.windows if w < n] + \
            [(n, n, args.tol) for n in args.steps_list] + \
            [(args.steps, w, t) for t in args.tols if t != args.tol for w in (min(args.windows), args.steps)]
    chains = {}
    for n, window, tol in sorted(set(cases)):
        if n not in chains:
            setup = build(cfg, n)
            with torch.no_grad():
                chains[n] = (setup, sdo.sample(setup.chain, setup.x))
        setup, reference = chains[n]
        began = time.perf_counter()
        result = sdo.picard_sample(setup.chain, setup.x, window=window, tol=tol)
        rows.append({"steps": n, "window": window, "tol": tol, "sweeps": result.sweeps, "calls": result.calls,
                     "converged": result.converged, "seconds": time.perf_counter() - began,
                     **_distance(result.sample, reference)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def latent_table(args, cfg) -> list[dict]:
    setup = build(cfg, args.steps)
    kw = dict(iterations=args.iterations, lr=args.lr, progress=False, generator=torch.Generator().manual_seed(0))
    sequential = sdo.optimize_latent(setup.chain, setup.x, setup.objective, **kw)
    rows = [{"forward": "sequential", "window": None, "tol": None, "seconds": sequential.seconds,
             "last_loss": sequential.losses[-1], "final_loss": float(sequential.final_loss.mean()),
             "losses": sequential.losses}]
    cases = [(args.steps, tol) for tol in sorted({args.tol, *args.tols}, reverse=True)] + [(min(args.windows), args.tol)]
    for window, tol in cases:
        for warm in (False, True):
            kw["generator"] = torch.Generator().manual_seed(0)
            picard = sdo.Picard(window=window, tol=tol, warm_start=warm)
            result = sdo.optimize_latent(setup.chain, setup.x, setup.objective, picard=picard, **kw)
            sweeps, calls = ([run[k] for run in result.picard_runs] for k in (0, 1))
            rows.append({
                "forward": "picard-warm" if warm else "picard-cold", "window": window, "tol": tol,
                "seconds": result.seconds, "last_loss": result.losses[-1],
                "final_loss": float(result.final_loss.mean()),  # of the final latent's sequential sample
                "first_sweeps": sweeps[0], "later_sweeps_mean": statistics.mean(sweeps[1:]),
                "later_calls_mean": statistics.mean(calls[1:]),
                "max_loss_gap": max(abs(a - b) for a, b in zip(result.losses, sequential.losses, strict=True)),
                "sweeps": sweeps, "losses": result.losses})
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("losses", "sweeps")}), flush=True)
    return rows


def _nearby(setup, lr):
    """A latent one Adam-sized step (lr per element) from the benchmark's: where the next iteration samples."""
    return setup.x + lr * torch.randn(setup.x.shape, generator=torch.Generator().manual_seed(1)).sign().to(setup.x)


def _sweeps_of(setup, picard: sdo.Picard):
    """(sweeps, calls) of the forward pass that ``Shortcut(picard=picard)`` runs on the benchmark's latent."""
    state = setup.chain.init_state(setup.x)
    result = picard(setup.chain, setup.x, state, range(len(setup.chain)))
    return result.sweeps, result.calls


def wall_table(args, cfg) -> list[dict]:
    """Seconds per SDO gradient: sequential forward, Picard cold, Picard warm-started from the trajectory of a
    latent one Adam-sized step away (what every iteration after the first of a latent optimization sees)."""
    setup = build(cfg, args.steps)
    nearby = _nearby(setup, args.lr)
    jobs = {"sequential": latent_gradient(setup.chain, setup.x, "sdo", setup.objective)}
    pickers = {}
    for window in sorted({min(args.windows), args.steps}):
        init = sdo.picard_sample(setup.chain, nearby, window=window, tol=args.tol).trajectory
        # the warm one starts every timed run from the same trajectory: a nearby latent's
        cold, warm = sdo.Picard(window=window, tol=args.tol), sdo.Picard(window=window, tol=args.tol, init=init)
        jobs[f"picard-cold-w{window}"] = latent_gradient(setup.chain, setup.x, sdo.Shortcut(picard=cold),
                                                         setup.objective)
        jobs[f"picard-warm-w{window}"] = latent_gradient(setup.chain, setup.x, sdo.Shortcut(picard=warm),
                                                         setup.objective)
        pickers[f"picard-cold-w{window}"], pickers[f"picard-warm-w{window}"] = cold, warm
    times = time_jobs(jobs, repeats=args.repeats, device=cfg.device, progress=False)
    base = statistics.median(times["sequential"])
    rows = []
    for name, values in times.items():
        seconds = statistics.median(values)
        evaluations = calls = args.steps
        if name in pickers:  # the sweeps, then the kept step's call with a graph
            sweeps, calls = _sweeps_of(setup, pickers[name])
            evaluations, calls = sweeps + 1, calls + 1
        rows.append({"forward": name, "seconds": seconds, "ratio_to_sequential": seconds / base,
                     "sequential_evaluations": evaluations, "calls": calls})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def convergence_table(args, cfg) -> list[dict]:
    """Plain Picard iteration (Eqs. 7-8 of Dou et al.: every sweep over all N steps, no sliding window) from a
    cold start and from the fixed point of a latent one Adam-sized step away: after each sweep, the largest
    distance of any latent of the trajectory to the sequential one, relative to that latent's RMS."""
    setup = build(cfg, args.steps)
    nearby = _nearby(setup, args.lr)
    truth = sdo.picard_sample(setup.chain, setup.x, tol=0.0).trajectory
    starts = {"cold": None, "warm": sdo.picard_sample(setup.chain, nearby, tol=0.0).trajectory}
    rows = []
    for name, init in starts.items():
        errors = []
        for _ in range(args.steps):
            init = sdo.picard_sample(setup.chain, setup.x, tol=0.0, max_sweeps=1, init=init).trajectory
            errors.append(max(float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())
                              for a, b in zip(init[1:], truth[1:], strict=True)))
            if errors[-1] == 0.0:
                break
        rows.append({"start": name, "errors": errors,
                     "sweeps_to": {f"{t:g}": next((k + 1 for k, e in enumerate(errors) if e <= t), None) for t in (1e-1, 1e-2, 1e-3, 1e-4)}})
        print(json.dumps(rows[-1]["sweeps_to"] | {"start": name}), flush=True)
    return rows


def _fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def write_report(results: dict, out: Path) -> None:
    meta, lines = results["meta"], ["# Picard sampling and SDO on a Picard forward pass", ""]
    lines += ["Commands (in order; each writes the parts it names):", "", *[f"- `{c}`" for c in meta["commands"]], "",
              f"Model: {meta['model']}; batch {meta['batch']}; device "
              f"{meta['device']} ({meta['machine']}); torch {meta['torch']}. Tolerance as in ParaDiGMS: per item, "
              "mean squared change of a latent between sweeps <= tol^2 times the variance of the noise a DDPM step "
              "adds there.", ""]
    if results.get("sweeps"):
        lines += ["## Sweeps to converge (cold start)", "",
                  "| N | window | tol | sweeps | denoiser calls | N / sweeps | max abs to sequential | rel. RMS |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in results["sweeps"]:
            lines.append(f"| {r['steps']} | {r['window']} | {r['tol']:g} | {r['sweeps']} | {r['calls']} | "
                         f"{r['steps'] / r['sweeps']:.2f} | {r['max_abs']:.1e} | {r['rel_rms']:.1e} |")
        lines.append("")
    if results.get("convergence"):
        lines += [f"## Plain Picard iteration at N = {meta['steps']}: sweeps until every latent is within a relative "
                  "distance of the sequential trajectory", "",
                  "| start | <= 1e-1 | <= 1e-2 | <= 1e-3 | <= 1e-4 | distance after 1 / 5 / 10 sweeps |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for r in results["convergence"]:
            after = " / ".join(f"{r['errors'][k]:.1e}" for k in (0, 4, 9) if k < len(r["errors"]))
            lines.append(f"| {r['start']} | " + " | ".join(_fmt(r["sweeps_to"][t]) for t in ("0.1", "0.01", "0.001", "0.0001"))
                         + f" | {after} |")
        lines.append("")
    if results.get("latent"):
        lines += ["## Latent optimization: sweeps per iteration", "",
                  "| forward | window | tol | sweeps, 1st iteration | sweeps, later (mean) | calls, later (mean) | "
                  "last iteration's loss (its forward pass) | final loss (sequential sample) | max gap to sequential SDO's loss "
                  "curve | seconds |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in results["latent"]:
            lines.append(f"| {r['forward']} | {_fmt(r['window'])} | {_fmt(r['tol'])} | {_fmt(r.get('first_sweeps'))} | "
                         f"{_fmt(r.get('later_sweeps_mean'))} | {_fmt(r.get('later_calls_mean'))} | "
                         f"{r['last_loss']:.4f} | {r['final_loss']:.4f} | {_fmt(r.get('max_loss_gap'), 2)} | "
                         f"{r['seconds']:.1f} |")
        lines.append("")
    if results.get("wall"):
        lines += [f"## Wall time of one SDO gradient ({meta['device']})", "",
                  "| forward | sequential denoiser evaluations | denoiser calls (latent batches) | seconds | ratio to "
                  "sequential |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in results["wall"]:
            lines.append(f"| {r['forward']} | {r['sequential_evaluations']} | {r['calls']} | {r['seconds']:.3f} | "
                         f"{r['ratio_to_sequential']:.2f} |")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))


def plot(results: dict, out: Path, tol: float) -> None:
    if results.get("convergence"):
        length = max(len(r["errors"]) for r in results["convergence"])
        curves = {f"{r['start']} start": [e if e > 0 else float("nan") for e in r["errors"]] +
                  [float("nan")] * (length - len(r["errors"])) for r in results["convergence"]}
        report.plot_curves(curves, out / "convergence.png", f"Plain Picard iteration, N = {results['meta']['steps']}",
                           "sweep", "max rel. distance to sequential", x=range(1, length + 1), log="y")
    rows = [r for r in results.get("sweeps", []) if r["tol"] == tol]
    if not rows:
        return
    ns = sorted({r["steps"] for r in rows})
    found = {(r["steps"], "window = N" if r["window"] == r["steps"] else f"window {r['window']}"): r["sweeps"] for r in rows}
    labels = sorted({label for _, label in found}, key=lambda s: (s == "window = N", len(s), s))
    curves = {label: [found.get((n, label), float("nan")) for n in ns] for label in labels}
    curves["sequential: N"] = ns
    report.plot_curves(curves, out / "sweeps.png", f"Picard sweeps to converge (tol {tol:g})", "N (steps)",
                       "sequential denoiser evaluations", x=ns, log="xy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits", help="digits, or a diffusers UNet config JSON (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="N of the tolerance, latent and wall-time parts")
    parser.add_argument("--steps-list", type=_csv(int), default=(10, 25, 50, 100, 200))
    parser.add_argument("--windows", type=_csv(int), default=(5, 10, 25))
    parser.add_argument("--tol", type=float, default=sdo.Picard().tol)
    parser.add_argument("--tols", type=_csv(float), default=(0.1, 0.01))
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", type=_csv(str), default=("sweeps", "convergence", "latent", "wall"))
    parser.add_argument("--fresh", action="store_true", help="drop the parts a previous run left in --output")
    parser.add_argument("--quick", action="store_true", help="a smoke run: N 10 and 20, 3 iterations, 1 repeat")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "picard")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.steps_list, args.windows, args.iterations, args.repeats = 20, (10, 20), (5,), 3, 1
    args.output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = BenchConfig(model=args.model, batch=args.batch, device=args.device, dtype=args.dtype, progress=False,
                      sweep=(), quality_iterations=0, output=args.output)
    setup = build(cfg, args.steps)
    meta = {"model": setup.description, "batch": args.batch, "device": args.device, "torch": torch.__version__,
            "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "tol": args.tol, "steps": args.steps}
    previous = args.output / "results.json"
    results = json.loads(previous.read_text()) if previous.is_file() and not args.fresh else {}
    if results and any(results["meta"].get(k) != v for k, v in meta.items() if k != "torch"):
        raise SystemExit(f"{previous} holds a run with other settings ({results['meta']}): pass --fresh or another --output")
    command = "python " + " ".join(sys.argv)
    results["meta"] = meta | {"commands": [*results.get("meta", {}).get("commands", []), command]}
    parts = (("sweeps", sweeps_table), ("convergence", convergence_table), ("latent", latent_table), ("wall", wall_table))
    for part, fn in parts:
        if part in args.parts:
            results[part] = fn(args, cfg)
            (args.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")  # kept if interrupted
    write_report(results, args.output)
    plot(results, args.output, args.tol)
    print(f"wrote {args.output}/results.json, results.md and the figures")


if __name__ == "__main__":
    main()
