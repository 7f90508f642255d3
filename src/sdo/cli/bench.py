"""``sdo bench``: what one gradient costs with each strategy, and how close it is to backpropagation's (the SDO
paper's Table 3 and Fig. 11a), on the embedded digits UNet or any diffusers UNet built from its config.

For every strategy: seconds per gradient (warmed up, interleaved rounds; the minimum, with more rounds while a gradient
times below no-grad sampling, and the spread), peak memory (CPU: the peak resident size during the job over the size
before it; CUDA: ``max_memory_allocated``),
the peak bytes autograd holds saved, denoiser forward and backward calls, ratios to SDO, and the gradient's
cosine and norm ratio to Full's; then the same costs over a sweep of N, and gradient norms against
backpropagation depth. Writes bench.json (after every stage, so an interrupted run keeps what it measured),
bench.md, PNG plots and index.html.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import report
from ..chain import Chain
from ..checks import UsageError, reading
from ..denoiser import checkpoint_blocks
from ..gradients import Strategy, strategy_classes, strategy_for
from ..gradients.adjoint import Adjoint, reconstruction_error
from ..guidance import Guidance, guided_sample
from ..latent import optimize_latent
from ..measure import profile as bench
from ..measure.fidelity import gradient_fidelity, gradient_norm_by_depth
from ..sampling import sample
from .bench_report import write_report

__all__ = ["BenchConfig", "bench_rows", "build", "row_strategy", "run_bench"]

MB = 2**20

# the benchmark's rows: every registered gradient method at its best for a latent gradient (Strategy.for_latents, the
# name table of sdo.gradients), and these variants of one beside it
_VARIANTS = {"adjoint-exact": ("adjoint", lambda n, generator: Adjoint(exact=True))}


def bench_rows() -> tuple[str, ...]:
    """The labels of the benchmark's rows, in the name table's order, each variant after its method; the methods
    that give a latent no gradient (ReFL, DRaFT-LV: weights only) have none."""
    rows = []
    for name, cls in strategy_classes().items():
        if cls.gives_latent_gradient:  # the table times a latent's gradient
            rows += [name, *(label for label, (base, _) in _VARIANTS.items() if base == name)]
    return tuple(rows)


def row_strategy(label: str, n: int, seed: int) -> Strategy:
    """A fresh strategy for the row ``label`` over ``n`` steps (a random one draws the same choices every run)."""
    generator = torch.Generator().manual_seed(seed)
    if label in _VARIANTS:
        return _VARIANTS[label][1](n, generator)
    return strategy_for(label, steps=n, generator=generator)


@dataclass
class BenchConfig:
    model: str = "digits"  # "digits" (the embedded UNet) or a diffusers denoiser config JSON (random weights)
    steps: int = 50  # N of the main table
    batch: int = 4
    sweep: tuple[int, ...] = (10, 25, 50, 100, 200)  # N values of the sweep (empty: no sweep)
    strategies: tuple[str, ...] = field(default_factory=bench_rows)
    params: bool = True  # also the gradient for every weight (what a fine-tuning step pays), at `steps`
    repeats: int = 3  # timed rounds at `steps`
    sweep_repeats: int = 1  # timed rounds at the other N of the sweep
    depths: tuple[int, ...] = (1, 2, 5, 10, 20, 50)  # Fig. 11a: backpropagation depths (capped at `steps`)
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    memory: bool = True  # peak memory and saved bytes
    guidance_scales: tuple[float, ...] = (0.05, 0.2)  # FreeDoM/UGD step sizes rho of the quality comparison
    time_travel: int = 3  # the time-travel row's repeats (at the first scale)
    quality_iterations: int = 10  # Adam steps of SDO latent optimization in the quality comparison (0: skip it)
    output: Path = field(default_factory=lambda: Path("sdo-bench"))
    progress: bool = True
    lora: int = 0  # the "+params" rows' weights: a LoRA of this rank on the attention (0: every weight)
    block_checkpointing: bool = False  # the denoiser's own gradient checkpointing inside its blocks
    fidelity: bool = True  # cosines to Full and norms by depth (they need Full's gradient)

    def __post_init__(self):
        unknown = [s for s in self.strategies if s not in bench_rows()]
        if unknown:
            raise UsageError(f"unknown strategies {unknown}; available: {', '.join(bench_rows())}")
        if "sdo" not in self.strategies:
            raise UsageError("the benchmark reports ratios to SDO: keep 'sdo' among the strategies")
        if self.dtype not in ("float32", "float64", "float16", "bfloat16"):
            raise UsageError(f"dtype must be float32, float64, float16 or bfloat16, got {self.dtype!r}")
        if self.quality_iterations < 0 or self.time_travel < 1:
            raise UsageError("quality_iterations must be >= 0 and time_travel >= 1")
        if self.model != "digits" and not Path(self.model).is_file():
            raise FileNotFoundError(f"{self.model}: no such model config file (or use --model digits)")
        self.output = Path(self.output)


@dataclass
class Setup:
    model: torch.nn.Module
    chain: Chain
    x: torch.Tensor
    objective: Callable[[torch.Tensor], torch.Tensor]
    description: str
    params: tuple = ()  # the weights of the "+params" rows: every weight, or the LoRA's


def build(cfg: BenchConfig, n: int) -> Setup:
    """The frozen model, an N-step DDIM chain, the latent batch and the objective."""
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    schedule = {}  # a flow schedule's extra set_timesteps arguments (FLUX's sigmas and mu)
    if cfg.model == "digits":
        from ..embedded import load_digits

        m = load_digits(cfg.device, dtype)
        model, scheduler = m.unet, m.scheduler
        labels = torch.arange(cfg.batch, device=cfg.device) % m.num_classes
        cond = {"class_labels": labels}
        classifier, target = m.classifier, (labels + 1) % m.num_classes

        def objective(x0):  # the adversarial task's loss: raise the log-probability of another digit
            return -classifier(x0).log_softmax(-1).gather(1, target[:, None])[:, 0]

        shape = (cfg.batch, 1, m.image_size, m.image_size)
        description = "embedded digits UNet2DModel (1x16x16, class-conditional), its DDIM scheduler"
    else:
        from ..backbones.families import random_backbone

        with reading(cfg.model, "the model config"):
            config = json.loads(Path(cfg.model).read_text())
        built = random_backbone(config, cfg.device, dtype, cfg.seed)
        model, scheduler, cond, schedule = built.denoiser, built.scheduler, built.cond, built.schedule(n)

        def objective(x0):
            return x0.float().pow(2).flatten(1).mean(1)

        shape = (cfg.batch, *built.latent_shape)
        description = f"{built.description} from {Path(cfg.model).name}"
    model.eval().requires_grad_(False)
    params = tuple(model.parameters())
    if cfg.lora:  # the "+params" rows: the gradient of a rank-`lora` LoRA on the attention (float32), not every weight
        from ..finetuning.lora import add_lora, lora_parameters

        add_lora(model, rank=cfg.lora, init_seed=cfg.seed)
        params = tuple(lora_parameters(model))
        for p in params:
            torch.nn.init.normal_(p, std=0.01)  # a trained LoRA's, not B = 0 (which would hide A's gradient)
            p.requires_grad_(False)
        description += f", LoRA rank {cfg.lora}"
    if cfg.block_checkpointing:  # recompute inside the blocks of every call that keeps a graph
        checkpoint_blocks(model)
        description += ", checkpointing inside its blocks"
    chain = Chain.from_diffusers(model, scheduler, n, cond=cond, **schedule)
    x = torch.randn(shape, generator=gen).to(cfg.device, dtype) * chain.init_noise_sigma
    return Setup(model, chain, x, objective, description, params)


def _job(setup: Setup, label: str, n: int, cfg: BenchConfig) -> Callable:
    """One gradient (or no-grad sampling for "nograd"); "+params" adds every weight's gradient."""
    name, with_params = label.removesuffix("+params"), label.endswith("+params")
    if name == "nograd":
        return bench.latent_gradient(setup.chain, setup.x, None, None)
    params = setup.params if with_params else ()

    def run():
        strategy = row_strategy(name, n, cfg.seed)
        for p in params:
            p.requires_grad_(True)
        try:
            return bench.latent_gradient(setup.chain, setup.x, strategy, setup.objective, params=params)()
        finally:
            for p in params:
                p.requires_grad_(False)

    return run


def _profile(setup: Setup, job: Callable, cfg: BenchConfig) -> dict:
    """One more run of ``job``, under every probe at once: denoiser calls, peak memory and peak saved bytes."""
    exclude = (*setup.model.parameters(), *setup.model.buffers())
    saved = []
    with bench.CallCounter(setup.model) as calls:
        if cfg.memory:
            if torch.device(cfg.device).type == "cuda":
                torch.cuda.empty_cache()
            peak = bench.peak_memory(lambda: saved.append(bench.saved_tensor_bytes(job, exclude)), cfg.device)
        else:
            job()
    row = {"forward": calls.forward, "backward": calls.backward}
    if cfg.memory:
        row.update(peak_mb=peak / MB, saved_mb=saved[0] / MB)
    return row


def _measure(setup: Setup, cfg: BenchConfig, n: int, labels: list[str], repeats: int) -> dict[str, dict]:
    jobs = {label: _job(setup, label, n, cfg) for label in labels}
    times = bench.time_above_floor(jobs, "nograd", repeats=repeats, device=cfg.device, progress=cfg.progress)
    rows = {}
    for label, job in jobs.items():
        rows[label] = {**bench.timing_row(times[label]), "all_seconds": times[label], **_profile(setup, job, cfg)}
    if "nograd" in rows and any(r["seconds"] < rows["nograd"]["seconds"] for k, r in rows.items() if k != "nograd"):
        rows["nograd"]["below_floor"] = True  # still, after the extra rounds: printed as noise, not hidden
    return rows


def _meta(cfg: BenchConfig, setup: Setup) -> dict:
    import diffusers

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "command": _command(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": cfg.device,
        "cuda_device": torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda") else None,
        "model": setup.description, "model_params": sum(p.numel() for p in setup.model.parameters()),
        "latent_shape": list(setup.x.shape),
        "memory": "peak RSS during the job (VmHWM, reset before it) over the RSS before it" if cfg.device == "cpu"
        else "max_memory_allocated over the allocation before the job",
    }


def _command() -> str:
    if sys.argv[0].endswith(".py"):
        return shlex.join(["python", *sys.argv])
    return shlex.join(["sdo", *sys.argv[1:]]) if Path(sys.argv[0]).name == "sdo" else shlex.join(sys.argv)


def _ratios(rows: dict[str, dict]) -> None:
    if "sdo" not in rows:
        return
    ref = rows["sdo"]
    for row in rows.values():
        row["time_vs_sdo"] = row["seconds"] / ref["seconds"]
        if "peak_mb" in row and "peak_mb" in ref:
            row["peak_vs_sdo"] = row["peak_mb"] / max(ref["peak_mb"], 1e-9)


def run_bench(cfg: BenchConfig) -> dict:
    """Measure everything, write bench.json / bench.md / plots / index.html to ``cfg.output``; return the results."""
    cfg.output.mkdir(parents=True, exist_ok=True)
    n = cfg.steps
    setup = build(cfg, n)
    results: dict = {"meta": _meta(cfg, setup), "config": {**dataclasses.asdict(cfg), "output": str(cfg.output)}}

    def save():
        (cfg.output / "bench.json").write_text(json.dumps(results, indent=2) + "\n")

    labels = ["nograd", *cfg.strategies]
    if cfg.params:
        labels += [f"{s}+params" for s in cfg.strategies]
    print(f"{setup.description}; {results['meta']['model_params']:,} params; latent {tuple(setup.x.shape)}; N={n}")
    results["main"] = _measure(setup, cfg, n, labels, cfg.repeats)
    _ratios({k: v for k, v in results["main"].items() if not k.endswith("+params")})
    _ratios({k.removesuffix("+params"): v for k, v in results["main"].items() if k.endswith("+params")})
    save()

    if cfg.fidelity:
        named = {s: row_strategy(s, n, cfg.seed) for s in cfg.strategies if s != "full"}
        fidelity = gradient_fidelity(setup.chain, setup.x, setup.objective, named, seed=cfg.seed)
        results["fidelity"] = {k: dataclasses.asdict(v) for k, v in fidelity.items()}
        depths = [d for d in cfg.depths if d <= n]
        results["depth"] = {"depths": depths, "norms": gradient_norm_by_depth(
            setup.chain, setup.x, setup.objective, depths, ("full", "sdo", "truncated"), seed=cfg.seed)}
        save()

    if cfg.quality_iterations or cfg.guidance_scales:
        results["quality"] = _quality(cfg, setup)
        save()

    results["sweep"], results["sweep_fidelity"] = {}, {}
    for m in cfg.sweep:
        print(f"sweep: N={m}")
        swept = setup if m == n else build(cfg, m)
        rows = results["main"] if m == n else _measure(swept, cfg, m, ["nograd", *cfg.strategies], cfg.sweep_repeats)
        results["sweep"][str(m)] = {k: v for k, v in rows.items() if not k.endswith("+params")}
        if cfg.fidelity:
            results["sweep_fidelity"][str(m)] = _sweep_fidelity(swept, cfg, m, results["fidelity"] if m == n else None)
        save()
    results["derived"] = _derived(results, cfg)
    save()
    write_report(results, cfg)
    return results


def _quality(cfg: BenchConfig, setup: Setup) -> dict:
    """One-step guidance (FreeDoM / UGD) against SDO latent optimization, judged on the samples: the objective,
    how far each sample moved from the unguided one, the share of pixels outside [-1, 1], and seconds."""
    with torch.no_grad():
        plain = sample(setup.chain, setup.x)
    samples, seconds = {"plain": plain}, {"plain": 0.0}
    runs = [(f"guidance rho={rho}", Guidance(setup.objective, scale=rho)) for rho in cfg.guidance_scales]
    if cfg.guidance_scales and cfg.time_travel > 1:
        rho = cfg.guidance_scales[0]
        runs.append((f"guidance rho={rho} r={cfg.time_travel}", Guidance(setup.objective, scale=rho,
                                                                         time_travel=cfg.time_travel)))
    for label, guidance in runs:
        began = time.perf_counter()
        noise = torch.Generator().manual_seed(cfg.seed)
        samples[label] = guided_sample(setup.chain, setup.x, guidance, generator=noise)
        seconds[label] = time.perf_counter() - began
    if cfg.quality_iterations:
        label = f"sdo, {cfg.quality_iterations} Adam steps lr 0.05"
        result = optimize_latent(setup.chain, setup.x, setup.objective, strategy="sdo",
                                 iterations=cfg.quality_iterations, lr=0.05, progress=False)
        samples[label], seconds[label] = result.best_sample, result.seconds
    rows = {}
    for label, x0 in samples.items():
        with torch.no_grad():
            rows[label] = {
                "objective": float(setup.objective(x0).mean()),
                "mean_abs_change": float((x0 - plain).abs().mean()),
                "out_of_range": float((x0.abs() > 1.0 + 1e-3).float().mean()),
                "seconds": seconds[label],
            }
    if setup.x.shape[1] in (1, 3):
        report.save_grid([(label, x0[:8]) for label, x0 in samples.items()], cfg.output / "quality.png",
                         title="one-step guidance vs SDO latent optimization")
    return rows


def _sweep_fidelity(setup: Setup, cfg: BenchConfig, n: int, known: dict | None = None) -> dict:
    """How SDO's and the continuous adjoint's gradients, and the adjoint's rebuilt x_T, depend on N (``known``:
    the main table's fidelity rows, when N is the main table's)."""
    named = {s: row_strategy(s, n, cfg.seed) for s in ("sdo", "adjoint") if s in cfg.strategies}
    if known is not None:
        out = {k: dict(known[k]) for k in named}
    else:
        fidelity = gradient_fidelity(setup.chain, setup.x, setup.objective, named)
        out = {k: dataclasses.asdict(v) for k, v in fidelity.items()}
    if "adjoint" in named:
        out["adjoint"]["reconstruction_error_x_T"] = reconstruction_error(setup.chain, setup.x)[0]
    return out


def _derived(results: dict, cfg: BenchConfig) -> dict:
    main, out = results["main"], {}
    for other in ("adjoint", "adjoint-exact", "reversible", "full"):
        if other in main:
            out[f"sdo_time / {other}_time"] = main["sdo"]["seconds"] / main[other]["seconds"]
            if "peak_mb" in main["sdo"]:
                out[f"sdo_peak / {other}_peak"] = main["sdo"]["peak_mb"] / main[other]["peak_mb"]
    sweep = results.get("sweep", {})
    ns = sorted(int(k) for k in sweep)
    if len(ns) >= 2 and cfg.memory:
        lo, hi = str(ns[0]), str(ns[-1])
        for s in ("sdo", "full"):
            if s in sweep[lo]:
                slope = (sweep[hi][s]["peak_mb"] - sweep[lo][s]["peak_mb"]) / (ns[-1] - ns[0])
                out[f"{s}_peak_mb_per_step"] = slope
    return out
