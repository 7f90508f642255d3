"""``sdo demo``: the paper's latent tasks end to end on the embedded digits models, offline, on a CPU.

1. Adversarial generation (Sec. 5.1.4, :mod:`sdo.recipes.attack`): class-conditional samples the classifier gets right;
   the initial noise is optimized inside an L-infinity ball so that the classifier misreads the clamped sample;
   the same samples for SDO, Full, Truncated(1), AdjointDPM and DOODL, each at its tuned learning rate, under
   plain gradient descent (``rules``: and/or sign-gradient PGD); success with 95% Wilson intervals. The committed
   benchmark with n = 100 is ``benchmarks/adversarial_digits.py``.
2. Style guidance (Sec. 5.1.2): the latent at an intermediate step (t ~ 600 of 1000) is optimized so that the
   Gram matrices of the classifier's conv features match a reference texture's.
3. Cost (the Table 3 analogue): time and peak memory of one latent gradient per strategy, ratios to SDO; timed in
   interleaved rounds after a warm-up, the minimum as the estimate, with more rounds while a ratio sits below its
   physical floor (no-grad sampling does a strict part of every gradient's work).

Everything lands in one folder: PNG grids and curves, ``metrics.json`` and ``index.html``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import report
from ..chain import Chain
from ..checks import UsageError
from ..embedded import load_digits
from ..gradients import RandomTruncated, get_strategy
from ..latent import optimize_latent
from ..measure import profile as bench
from ..objectives.image import Clamped, ClassifierMargin, FeatureMatch, GramStyle, WeightedSum
from ..recipes import attack
from ..sampling import sample

__all__ = ["DemoConfig", "run_demo"]

SHOWN = 8  # samples per row in the figures


@dataclass
class DemoConfig:
    output: Path  # folder for the report (created; must not be a file)
    seed: int = 0  # seeds every latent and noise draw
    device: str = "cpu"
    quick: bool = False  # a smoke run: few samples, steps and iterations (well under a minute)
    samples: int = 8  # adversarial samples (the style task uses half as many)
    steps: int = 30  # DDIM steps of every chain
    iterations: int = 30  # optimization steps of the adversarial task
    tau: float = 0.1  # radius of the L-infinity ball around the initial noise
    lr: float | None = None  # learning rate of the adversarial task (None: each method's tuned one, sdo.recipes.attack)
    rules: tuple[str, ...] = ("plain",)  # adversarial step rules: "plain" gradient descent (the paper's), "sign" PGD
    style_t: int = 600  # the style task optimizes the latent at the step whose timestep is closest to this
    style_iterations: int = 30
    style_lr: float = 0.05
    content_weight: float = 0.3  # weight of the content term that keeps the digit recognizable
    cost_repeats: int = 5  # timed rounds of the cost table (after a warm-up; more while a ratio is below its floor)

    def __post_init__(self):
        self.output = Path(self.output)
        if self.quick:
            self.samples, self.steps, self.iterations = (min(self.samples, 4), min(self.steps, 10),
                                                         min(self.iterations, 4))
            self.style_iterations, self.cost_repeats = min(self.style_iterations, 4), 1
        for name in ("samples", "steps", "iterations", "style_iterations", "cost_repeats"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.rules = (self.rules,) if isinstance(self.rules, str) else tuple(self.rules)
        if not self.rules or any(r not in ("plain", "sign") for r in self.rules):
            raise UsageError(f"rules must be 'plain' and/or 'sign', got {self.rules}")
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"lr must be > 0 or None, got {self.lr}")
        for name in ("tau", "style_lr"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.content_weight >= 0:
            raise UsageError(f"content_weight must be >= 0, got {self.content_weight}")
        if self.output.exists() and not self.output.is_dir():
            raise UsageError(f"output {self.output} exists and is not a folder")


def _noise(n: int, seed: int, device) -> torch.Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)).to(device)


def _predict(classifier, images):
    probs = classifier(images.clamp(-1, 1)).softmax(-1)
    return probs.argmax(-1), probs.max(-1).values


def _captions(classifier, images):
    labels, probs = _predict(classifier, images)
    return [f"{int(c)} ({p:.2f})" for c, p in zip(labels.tolist(), probs.tolist(), strict=True)]


def adversarial(models, cfg: DemoConfig, progress: bool = True):
    """Sec. 5.1.4 as a fair comparison (:mod:`sdo.recipes.attack`): the same correctly read samples for every method,
    the margin of the clamped sample, each method at its tuned learning rate under plain gradient descent and under
    sign-gradient PGD; success with 95% Wilson intervals."""
    labels, x_T, original = attack.correct_samples(models, cfg.samples, cfg.steps, cfg.seed, cfg.device)
    chain = Chain.from_diffusers(models.unet, models.scheduler, cfg.steps, cond={"class_labels": labels})
    objective = Clamped(ClassifierMargin(models.classifier, labels, margin=1.0))
    rows, captions = [("original", original[:SHOWN])], [_captions(models.classifier, original[:SHOWN])]
    metrics, curves = {}, {}
    # how each method's first gradient compares with the exact one (Full's), item by item
    first = {m: bench.latent_gradient(chain, x_T, get_strategy(name, **kw), objective)().flatten(1)
             for m, (name, kw) in attack.METHODS.items()}
    for method in attack.METHODS:
        for rule in cfg.rules:
            lr = attack.TUNED_LR[(method, rule)] if cfg.lr is None else cfg.lr
            run, adv = attack.attack(models, labels, x_T, original, method, rule, lr, steps=cfg.steps,
                                     iterations=cfg.iterations, tau=cfg.tau, progress=progress, return_samples=True)
            low, high = run.interval()
            metrics[f"{method}/{rule}"] = {
                "method": method, "rule": rule, "lr": lr, "successes": sum(run.success), "n": len(run.success),
                "success_rate": run.rate, "wilson_low": low, "wilson_high": high, "mean_abs_change": run.change,
                "seconds": run.seconds,
                "gradient_cosine_to_full": F.cosine_similarity(first[method], first["full"]).mean().item(),
                "gradient_norm_ratio_to_full": (first[method].norm(dim=1) / first["full"].norm(dim=1)).mean().item(),
            }
            curves[f"{method}/{rule}"] = run.losses
            if rule == cfg.rules[0]:
                rows += [(method, adv[:SHOWN]), (f"{method} Δ×5", 5 * (adv - original.clamp(-1, 1))[:SHOWN])]
                captions += [_captions(models.classifier, adv[:SHOWN]), []]
    out = cfg.output
    report.save_grid(rows, out / "adversarial.png", captions,
                     title=f"adversarial samples, {cfg.rules[0]} rule (L∞ τ={cfg.tau} on x_T); caption: the "
                     "classifier's label (prob)")
    report.plot_curves(curves, out / "adversarial_loss.png", "adversarial margin loss (clamped sample)", "iteration",
                       "mean loss")
    return {"labels": labels.tolist(), "tau": cfg.tau, "iterations": cfg.iterations, "steps": cfg.steps,
            "rules": list(cfg.rules), "strategies": metrics}


def _stripes(device) -> torch.Tensor:
    """The style reference: diagonal stripes of period 8 pixels, in [-1, 1]."""
    i = torch.arange(16.0)
    return torch.sin(2 * math.pi * (i[:, None] + i[None, :]) / 8).reshape(1, 1, 16, 16).to(device)


def style(models, cfg: DemoConfig, progress: bool = True):
    """Sec. 5.1.2: Gram-matrix style of the classifier's conv features, from the latent at t ~ style_t."""
    n, dev = max(1, cfg.samples // 2), cfg.device
    labels = (torch.arange(n, device=dev) * 3 + 1) % models.num_classes
    chain = Chain.from_diffusers(models.unet, models.scheduler, cfg.steps, cond={"class_labels": labels})
    start = int((chain.timesteps - cfg.style_t).abs().argmin())
    x_T = _noise(n, cfg.seed + 1, dev)
    reference = _stripes(dev)
    style_loss = GramStyle(models.classifier.features, reference, layers=[0, 1])
    with torch.no_grad():
        x_start = sample(chain, x_T, stop=start)
        before = sample(chain, x_start, start=start)
    # style of the first two conv layers, content (Gatys et al.) of the last one, against the unstyled sample
    content = FeatureMatch(models.classifier.features, before, layers=[2])
    objective = WeightedSum([(1.0, style_loss), (cfg.content_weight, content)])
    result = optimize_latent(
        chain, x_start, objective, strategy="sdo", start=start, iterations=cfg.style_iterations,
        lr=cfg.style_lr, progress=progress,
    )
    after = result.best_sample
    with torch.no_grad():
        loss_before, loss_after = style_loss(before).mean().item(), style_loss(after).mean().item()
    agree_before = (_predict(models.classifier, before)[0] == labels).float().mean().item()
    agree_after = (_predict(models.classifier, after)[0] == labels).float().mean().item()
    out = cfg.output
    report.save_grid(
        [("reference", reference), ("before", before[:SHOWN]), ("after", after[:SHOWN])], out / "style.png",
        [["stripes"], _captions(models.classifier, before[:SHOWN]), _captions(models.classifier, after[:SHOWN])],
        title=f"style guidance from the latent at t={int(chain.timesteps[start])} (step {start} of {len(chain)})",
    )
    report.plot_curves({"sdo": result.losses}, out / "style_loss.png", "style + content loss", "iteration", "mean loss")
    return {
        "labels": labels.tolist(), "start_step": start, "start_timestep": int(chain.timesteps[start]),
        "loss_before": loss_before, "loss_after": loss_after, "content_weight": cfg.content_weight,
        "objective_before": objective(before).mean().item(), "objective_after": result.best_loss.mean().item(),
        "classifier_agreement_before": agree_before, "classifier_agreement_after": agree_after,
        "seconds": result.seconds, "iterations": cfg.style_iterations,
    }


def cost(models, cfg: DemoConfig, progress: bool = True):
    """Table 3 analogue: one latent gradient per strategy, time and peak memory as ratios to SDO."""
    n, dev = cfg.samples, cfg.device
    labels = torch.arange(n, device=dev) % models.num_classes
    chain = Chain.from_diffusers(models.unet, models.scheduler, cfg.steps, cond={"class_labels": labels})
    x_T = _noise(n, cfg.seed + 2, dev)

    def objective(x0):
        return F.cross_entropy(models.classifier(x0), labels, reduction="none")

    strategies = {
        "no-grad sampling": None,
        "sdo": get_strategy("sdo"),
        "truncated": get_strategy("truncated", k=1),
        "random-truncated": RandomTruncated(1, cfg.steps, generator=torch.Generator().manual_seed(cfg.seed)),
        "checkpoint": get_strategy("checkpoint"),
        "full": get_strategy("full"),
    }
    jobs = {name: bench.latent_gradient(chain, x_T, s, objective) for name, s in strategies.items()}
    peaks = {name: bench.peak_memory(job, dev) / 2**20 for name, job in jobs.items()}  # also the warm-up runs
    times = bench.time_above_floor(jobs, "no-grad sampling", repeats=cfg.cost_repeats, device=dev, progress=progress)
    table = {name: {**bench.timing_row(times[name]), "peak_mb": peaks[name]} for name in jobs}
    ref = table["sdo"]
    for row in table.values():
        row["time_vs_sdo"] = row["seconds"] / ref["seconds"]
        row["memory_vs_sdo"] = row["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else float("nan")
    floor = table["no-grad sampling"]["time_vs_sdo"]
    table["no-grad sampling"]["below_floor"] = floor > 1  # still true after the extra rounds: say so, not hide it
    report.plot_bars(
        {"seconds per gradient ÷ SDO's": {k: v["time_vs_sdo"] for k, v in table.items()},
         "peak memory ÷ SDO's": {k: v["memory_vs_sdo"] for k, v in table.items()}},
        cfg.output / "cost.png", f"one latent gradient, {cfg.steps} DDIM steps, batch {n}", reference=1.0,
    )
    return {"steps": cfg.steps, "batch": n, "device": str(dev), "repeats": cfg.cost_repeats, "strategies": table}


def _summary(metrics: dict) -> tuple[list[tuple[str, tuple, list]], str]:
    adv = metrics["adversarial"]["strategies"]
    adv_table = (["method", "rule", "lr", "success", "95% Wilson", "mean |Δ sample|", "seconds", "cos(∇, ∇full)",
                  "|∇| / |∇full|"],
                 [[v["method"], v["rule"], v["lr"], f"{v['successes']}/{v['n']}",
                   f"[{v['wilson_low']:.2f}, {v['wilson_high']:.2f}]", v["mean_abs_change"], v["seconds"],
                   v["gradient_cosine_to_full"], v["gradient_norm_ratio_to_full"]] for v in adv.values()])
    st = metrics["style"]
    style_table = (["", "style loss", "classifier agreement"],
                   [["before", st["loss_before"], st["classifier_agreement_before"]],
                    ["after", st["loss_after"], st["classifier_agreement_after"]]])
    co = metrics["cost"]["strategies"]
    cost_table = (["strategy", "seconds (min)", "median / max", "× SDO time", "peak MB", "× SDO memory"],
                  [[k, v["seconds"], f"{v['median_seconds']:.3f} / {v['max_seconds']:.3f}",
                    f"{v['time_vs_sdo']:.2f}" + (" (noise: above SDO's)" if v.get("below_floor") else ""),
                    v["peak_mb"], v["memory_vs_sdo"]] for k, v in co.items()])
    tables = [("Adversarial generation", adv_table), ("Style guidance", style_table),
              ("Cost of one latent gradient", cost_table)]
    text = "\n\n".join(f"{title}\n{report.format_table(*table)}" for title, table in tables)
    return tables, text


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Run the three tasks, write the report into ``cfg.output`` and return the metrics."""
    began = time.perf_counter()
    cfg.output.mkdir(parents=True, exist_ok=True)
    models = load_digits(device=cfg.device)
    metrics = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}}
    for name, task in (("adversarial", adversarial), ("style", style), ("cost", cost)):
        metrics[name] = task(models, cfg, progress)
        metrics["seconds"] = time.perf_counter() - began
        # after every task, so that an interrupted run keeps what it finished
        (cfg.output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    tables, text = _summary(metrics)
    st = metrics["style"]
    report.write_index(
        cfg.output / "index.html", "sdo demo: the paper's latent tasks on the embedded digits models",
        [
            {"heading": tables[0][0], "table": tables[0][1], "images": ["adversarial.png", "adversarial_loss.png"],
             "text": f"{len(metrics['adversarial']['labels'])} correctly classified samples; x_T optimized for "
                     f"{cfg.iterations} steps of plain gradient descent ('plain', the paper's rule) or sign-gradient "
                     "PGD ('sign'), each method at its tuned learning rate (sdo.recipes.attack.TUNED_LR), "
                     "of the margin "
                     f"loss of the clamped sample inside an L∞ ball of radius {cfg.tau}; {cfg.steps} DDIM steps. "
                     "Success: the reported sample (lowest loss) is misread; 95% Wilson intervals."},
            {"heading": tables[1][0], "table": tables[1][1], "images": ["style.png", "style_loss.png"],
             "text": f"latent at t={st['start_timestep']} optimized with SDO for {st['iterations']} steps so the Gram "
                     "matrices of the classifier's first two conv layers match the stripes, plus "
                     f"{cfg.content_weight} x a content loss on its last conv layer against the unstyled sample. "
                     "Style loss is the Gram term alone."},
            {"heading": tables[2][0], "table": tables[2][1], "images": ["cost.png"],
             "text": "Minimum of interleaved timed rounds after a warm-up (the spread: median and maximum in "
                     "metrics.json); rounds are added while no-grad sampling times above a gradient, which does all of "
                     "its work; peak memory over the resident size before the gradient (CUDA: max_memory_allocated)."},
        ],
    )
    print(f"\n{text}\n\nreport: {cfg.output / 'index.html'} ({metrics['seconds']:.0f} s)")
    return metrics
