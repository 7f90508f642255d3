"""Cost of one latent gradient through a diffusion sampling chain, for each gradient strategy of ``sdo``.

Setup: a class-conditional diffusers ``UNet2DModel`` (~1.1M parameters, 3 channels, 16x16, block_out_channels
(32, 64, 64), one resnet per level, self-attention at the middle (8x8) level and in the mid block,
``num_class_embeds=10``) built from its config with a fixed seed (random weights), ``DDIMScheduler(clip_sample=False)`` with ``--steps`` steps (50),
batch ``--batch`` (4). The model is frozen (``requires_grad_(False)``), as when optimizing a latent.

Jobs:
  nograd            ``with torch.no_grad(): sdo.sample(chain, x)`` (plain sampling, the reference)
  full, checkpoint, truncated (k=1), random-truncated (k ~ U{1..steps}, generator reseeded on every run so
  each run draws the same k, printed), sdo
                    x = randn latent (requires_grad); x0 = sdo.sample(chain, x, strategy=s);
                    loss = (x0**2).mean(); g, = torch.autograd.grad(loss, x)
  full+params, sdo+params
                    the gradient with respect to x and every model parameter (Eq. 20's cost: what a fine-tuning
                    step pays), ``torch.autograd.grad(loss, [x, *model.parameters()])

Time: every job is run once as a warm-up, then ``--repeats`` rounds each run every job once in turn
(interleaved, so drifts of the machine hit all jobs alike); the median is reported. On CUDA the device is
synchronized around each run.

Memory, two figures:
  peak MB   CPU: each job runs in a fresh subprocess (this script with ``--measure-one JOB``) that builds the
            model, records its current RSS (/proc/self/statm), runs the job twice and reports the peak RSS
            (VmHWM; see peak_rss_bytes for why not ru_maxrss) minus that baseline. It includes one-time costs
            of a first run (~20 MB), common to all jobs. CUDA: ``max_memory_allocated`` minus the allocation
            before the run.
  saved MB  bytes of the tensors autograd saves for backward during one run (``saved_tensors_hooks``; unique
            storages, the model's own parameters excluded): the graph memory that full backprop grows with N.
            ``checkpoint`` hides its saves behind its own hooks and recomputes one step at a time in backward,
            so it shows ~0 here; its real cost is in the peak column.

Run ``python benchmarks/core_cost.py`` (full settings) or ``--quick`` (5 steps, 1 repeat) for a smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import diffusers
import torch
from diffusers import DDIMScheduler, UNet2DModel

import sdo
from sdo import bench

STRATEGIES = ["full", "checkpoint", "truncated", "random-truncated", "sdo"]
PARAM_JOBS = ["full+params", "sdo+params"]
RESULTS = Path(__file__).resolve().parent / "results"
MB = 2**20


class RecordingRandomTruncated(sdo.RandomTruncated):
    """RandomTruncated that remembers the k it drew (the number of denoiser calls that kept a graph)."""

    def select(self, steps):
        keep = super().select(steps)
        self.last_k = len(keep)
        return keep


def build(args):
    """The frozen model, the chain and the fixed starting latent."""
    torch.manual_seed(args.seed)
    model = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, num_class_embeds=10,
    ).to(args.device).eval().requires_grad_(False)
    labels = torch.arange(args.batch, device=args.device) % 10
    chain = sdo.Chain.from_diffusers(
        model, DDIMScheduler(clip_sample=False), args.steps, cond={"class_labels": labels}
    )
    x = torch.randn(args.batch, 3, 16, 16, generator=torch.Generator().manual_seed(args.seed + 1)).to(args.device)
    return model, chain, x


def make_job(name, model, chain, x, args):
    """A callable running job ``name`` once (``sdo.bench.latent_gradient``); ``run.info`` holds the k that
    random-truncated drew (its generator is reseeded on every run, so every run draws the same k)."""
    strategy_name, with_params = name.removesuffix("+params"), name.endswith("+params")
    if strategy_name == "nograd":
        run = bench.latent_gradient(chain, x, None, None)
        run.info = {}
        return run
    if strategy_name == "random-truncated":
        strategy = RecordingRandomTruncated(1, args.steps, generator=torch.Generator())
    else:
        strategy = sdo.get_strategy(strategy_name)
    params = tuple(model.parameters()) if with_params else ()
    grad = bench.latent_gradient(chain, x, strategy, lambda x0: (x0**2).mean(), params=params)
    info = {}

    def run():
        if isinstance(strategy, RecordingRandomTruncated):
            strategy.generator.manual_seed(args.seed)
        model.requires_grad_(with_params)
        try:
            return grad()
        finally:
            model.requires_grad_(False)
            if isinstance(strategy, RecordingRandomTruncated):
                info["k"] = strategy.last_k

    run.info = info
    return run


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux's ru_maxrss of a forked-then-exec'd child also
    counts the RSS the fork inherited from the parent (kept across exec), i.e. this benchmark's own footprint."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KB on Linux


def measure_one(args):
    """Child process: peak RSS increase of one job over the RSS after building the model (bytes, printed)."""
    model, chain, x = build(args)
    job = make_job(args.measure_one, model, chain, x, args)
    baseline = rss_bytes()
    job()
    job()
    print("RESULT " + json.dumps({"job": args.measure_one, "peak_bytes": peak_rss_bytes() - baseline}))


def peak_memory(name, job, args):
    """Peak memory increase of one run of ``job`` (bytes): a subprocess on CPU, the CUDA allocator on GPU."""
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        return bench.peak_memory(job, args.device)
    cmd = [sys.executable, __file__, "--measure-one", name, "--steps", str(args.steps), "--batch", str(args.batch),
           "--seed", str(args.seed), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    line = next(s for s in out.splitlines() if s.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))["peak_bytes"]


def cpu_info():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "model_name": model, "torch_threads": torch.get_num_threads(),
            "loadavg_1_5_15": os.getloadavg()}  # other processes on the machine skew the timings


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps N (default 50)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (default: leave torch's default); on a busy shared machine 1 thread\n"
                        "is far steadier than 2 (OpenMP threads that get preempted stall each other)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the latent and random-truncated's k")
    p.add_argument("--no-params", action="store_true", help="skip the full+params and sdo+params jobs")
    p.add_argument("--quick", action="store_true", help="smoke test: 5 steps, 1 repeat (writes *_quick.json/.md)")
    p.add_argument("--json", type=Path, default=None,
                   help="JSON output (default benchmarks/results/core_cost.json); the markdown goes next to it (.md)")
    p.add_argument("--measure-one", metavar="JOB", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_one:
        return measure_one(args)
    if args.quick:
        args.steps, args.repeats = 5, 1
    json_path = args.json or RESULTS / ("core_cost_quick.json" if args.quick else "core_cost.json")

    model, chain, x = build(args)
    n_params = sum(t.numel() for t in model.parameters())
    names = ["nograd", *STRATEGIES, *([] if args.no_params else PARAM_JOBS)]
    jobs = {n: make_job(n, model, chain, x, args) for n in names}
    print(f"UNet2DModel {n_params / 1e6:.3f}M params, 3x16x16, batch {args.batch}, DDIM N={args.steps}, "
          f"{args.device}, torch threads {torch.get_num_threads()}", flush=True)

    times = bench.time_jobs(jobs, repeats=args.repeats, device=args.device)  # a warm-up, then interleaved rounds

    rows = {}
    for name, job in jobs.items():
        rows[name] = {
            "seconds": statistics.median(times[name]),
            "all_seconds": times[name],
            "peak_mb": peak_memory(name, job, args) / MB,
            "saved_mb": None if name == "nograd" else bench.saved_tensor_bytes(job, exclude=(*model.parameters(), *model.buffers())) / MB,
        }
        if job.info:
            rows[name].update(job.info)
    base, full = rows["nograd"], rows["full"]
    for row in rows.values():
        row["x_nograd"] = row["seconds"] / base["seconds"]
        row["x_full"] = row["seconds"] / full["seconds"]
    sdo_row = rows["sdo"]
    derived = {
        "sdo_time / nograd_time": (sdo_row["x_nograd"], 1.10, "<="),
        "sdo_time / full_time": (sdo_row["x_full"], 0.55, "<="),
        "(sdo_peak - nograd_peak) / (full_peak - nograd_peak)": (
            (sdo_row["peak_mb"] - base["peak_mb"]) / (full["peak_mb"] - base["peak_mb"]), 0.05, "<="),
    }

    def label(name):
        return f"{name} (k={rows[name]['k']})" if "k" in rows[name] else name

    header = ["job", "seconds (median)", "min s", "x nograd", "x full", "peak MB", "saved MB"]
    table = [header, ["---"] * len(header)]
    for name, row in rows.items():
        saved = "-" if row["saved_mb"] is None else f"{row['saved_mb']:.1f}"
        table.append([label(name), f"{row['seconds']:.3f}", f"{min(row['all_seconds']):.3f}", f"{row['x_nograd']:.2f}", f"{row['x_full']:.2f}",
                      f"{row['peak_mb']:.1f}", saved])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in table]
    note = "" if args.steps == 50 else " [targets are for N=50]"
    derived_lines = [f"{k}: {v:.3f} (target {op} {t}) {'OK' if v <= t else 'MISSED'}{note}" for k, (v, t, op) in derived.items()]
    print("\n" + "\n".join(lines) + "\n\n" + "\n".join(derived_lines))

    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", __file__, *argv])
    meta = {
        "command": command,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "cpu": cpu_info(), "device": args.device,
        "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "model": {"class": "UNet2DModel", "params": n_params, "channels": 3, "resolution": 16,
                  "block_out_channels": [32, 64, 64], "layers_per_block": 1,
                  "attention": "middle (8x8) level and mid block", "attention_head_dim": 8,
                  "num_class_embeds": 10},
        "scheduler": "DDIMScheduler(clip_sample=False)", "steps": args.steps, "batch": args.batch,
        "repeats": args.repeats, "loss": "(x0**2).mean()",
        "peak_memory": "CUDA max_memory_allocated delta" if args.device.startswith("cuda")
        else "VmHWM - RSS after model build, fresh subprocess per job, job run twice",
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "jobs": rows, "derived": {k: v[0] for k, v in derived.items()}},
                                    indent=2) + "\n")
    cpu = meta["cpu"]
    md = [
        "# core_cost: one latent gradient per strategy", "",
        f"- command: `{command}`", f"- date: {meta['date']}",
        f"- torch {meta['torch']}, diffusers {meta['diffusers']}, python {meta['python']}",
        f"- CPU: {cpu['model_name']}, nproc {cpu['nproc']}, torch threads {cpu['torch_threads']}, load average at the end"
        f" {' '.join(f'{v:.2f}' for v in cpu['loadavg_1_5_15'])}; device {args.device}"
        + (f" ({meta['cuda_device']})" if meta["cuda_device"] else ""),
        f"- model: UNet2DModel {n_params:,} params, 3x16x16, (32, 64, 64), attention at the 8x8 level and mid block,"
        " 10 classes;"
        f" DDIM N={args.steps}, batch {args.batch}, frozen weights; loss (x0**2).mean();"
        f" median of {args.repeats} interleaved rounds after a warm-up",
        f"- peak MB: {meta['peak_memory']}; saved MB: autograd saved tensors (unique storages, parameters excluded)",
        "", *lines, "", *[f"- {s}" for s in derived_lines], "",
    ]
    json_path.with_suffix(".md").write_text("\n".join(md))
    print(f"\nwrote {json_path} and {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
