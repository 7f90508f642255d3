"""The ``sdo`` command: ``sdo demo`` (the main job), ``sdo bench``, ``sdo edit | style | aesthetic | adversarial``,
``sdo finetune``, ``sdo shortft``, ``sdo lora scale | merge`` and ``sdo train digits | digit-clip | student``."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from pathlib import Path

from .checks import NonFiniteError, UsageError, check_text
from .cli_finetune import add_parsers, run_finetune, run_lora

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage dump): ``sdo demo: error: ...``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _finite_float(minimum: float, inclusive: bool):
    """An argparse type: a finite float > minimum (>= with ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and (value >= minimum if inclusive else value > minimum)):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {minimum:g}, got {text}")
        return value

    return parse


_positive_float = _finite_float(0.0, inclusive=False)
_non_negative_float = _finite_float(0.0, inclusive=True)


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device type {device.type!r} (cpu, cuda, mps)")
    return text


def _folder(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


def _output(args, prefix: str) -> Path:
    """The command's output folder, settled before any work: ``--output`` (a non-empty one only with
    ``--overwrite``) or a fresh ``<prefix>-<time>``; created and checked writable."""
    out = args.output
    if out is None:
        out = _fresh_folder(prefix)
    elif out.is_dir() and any(out.iterdir()) and not getattr(args, "overwrite", False):
        raise FileExistsError(f"{out} is not empty; pass --overwrite to write into it, or choose another --output")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the output folder {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"the output folder {out} is not writable")
    return out


def _fresh_folder(prefix: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path(f"{prefix}-{stamp}"), 1
    while path.exists():
        n += 1
        path = Path(f"{prefix}-{stamp}-{n}")
    return path


def _int_list(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text}")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(_non_negative_float(v) for v in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}") from None


def _bench_strategies() -> list[str]:
    from .benchmark import STRATEGIES

    return list(STRATEGIES)


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in _bench_strategies()]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown strategies {unknown}; choose from {', '.join(_bench_strategies())}")
    return names


def _rule_list(text: str) -> tuple[str, ...]:
    rules = tuple(v.strip() for v in text.split(",") if v.strip())
    if not rules or any(r not in ("plain", "sign") for r in rules):
        raise argparse.ArgumentTypeError(f"expected plain and/or sign, comma-separated; got {text!r}")
    return rules


# sdo.backbones.SCHEDULERS, spelled out so that parsing the command line imports no torch (a test keeps them equal)
_TASK_SCHEDULERS = ("ddim", "dpm-solver++", "lcm", "euler")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdo", description="Gradient-based control of diffusion sampling (SDO and its baselines).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="the paper's latent tasks on the embedded digits models (offline, CPU)",
                          description="Adversarial generation, style guidance and the cost table on the embedded "
                          "digits models; writes PNGs, metrics.json and index.html.")
    demo.add_argument("--output", type=_folder, default=None, help="report folder (default: a fresh sdo-demo-<time>)")
    demo.add_argument("--overwrite", action="store_true", help="write into an --output that is not empty (files of the same names are replaced)")
    demo.add_argument("--seed", type=_non_negative_int, default=0, help="seed of every latent and noise draw (default 0)")
    demo.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    demo.add_argument("--quick", action="store_true", help="a smoke run (4 samples, 10 steps, 4 iterations)")
    demo.add_argument("--samples", type=_positive_int, default=8, help="adversarial samples (default 8)")
    demo.add_argument("--steps", type=_positive_int, default=30, help="DDIM steps of every chain (default 30)")
    demo.add_argument("--iterations", type=_positive_int, default=30, help="adversarial optimization steps (default 30)")
    demo.add_argument("--tau", type=_positive_float, default=0.1, help="L-infinity radius around x_T (default 0.1)")
    demo.add_argument("--lr", type=_positive_float, default=None,
                      help="one learning rate for every adversarial method (default: each method's tuned one)")
    demo.add_argument("--rules", type=_rule_list, default=("plain",),
                      help="adversarial step rules, comma-separated: plain (gradient descent, the paper's; default), "
                      "sign (PGD)")
    demo.add_argument("--content-weight", type=_non_negative_float, default=0.3,
                      help="weight of the style task's content term (default 0.3; 0: style alone)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    bench = sub.add_parser("bench", help="cost and fidelity of every gradient strategy (the paper's Table 3)",
                           description="Seconds, peak memory, saved bytes, denoiser calls and gradient fidelity of one "
                           "gradient per strategy, a sweep over N and gradient norms against depth (Fig. 11a); writes "
                           "bench.json, bench.md, PNGs and index.html.")
    bench.add_argument("--model", default="digits",
                       help="'digits' (the embedded UNet, default) or a diffusers UNet2DModel / UNet2DConditionModel "
                       "config JSON, built with random weights (e.g. an SD-1.5-sized UNet on a GPU)")
    bench.add_argument("--steps", type=_positive_int, default=None, help="N of the main table (default 50)")
    bench.add_argument("--batch", type=_positive_int, default=None, help="batch size (default 4)")
    bench.add_argument("--sweep", type=_int_list, default=None,
                       help="comma-separated N values of the sweep (default 10,25,50,100,200; 'none' to skip)")
    bench.add_argument("--strategies", type=_name_list, default=None,
                       help="comma-separated subset of: " + ", ".join(_bench_strategies()))
    bench.add_argument("--repeats", type=_positive_int, default=None, help="timed rounds at --steps (default 3)")
    bench.add_argument("--sweep-repeats", type=_positive_int, default=1, help="timed rounds at other N (default 1)")
    bench.add_argument("--depths", type=_int_list, default=None,
                       help="backpropagation depths of the gradient-norm plot (default 1,2,5,10,20,50)")
    bench.add_argument("--no-params", action="store_true", help="skip the weight-gradient (+params) rows")
    bench.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    bench.add_argument("--guidance-scales", type=_float_list, default=(0.05, 0.2),
                       help="FreeDoM/UGD step sizes of the quality comparison (default 0.05,0.2; 'none' to skip)")
    bench.add_argument("--quality-iterations", type=_non_negative_int, default=None,
                       help="Adam steps of SDO in the quality comparison (default 10; 0 to skip)")
    bench.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    bench.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32",
                       help="dtype of the model and the latent (default float32; float16 needs a GPU)")
    bench.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    bench.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the latent, the weights and random draws")
    bench.add_argument("--output", type=_folder, default=None, help="folder (default: a fresh sdo-bench-<time>)")
    bench.add_argument("--overwrite", action="store_true", help="write into an --output that is not empty (files of the same names are replaced)")
    bench.add_argument("--quick", action="store_true",
                       help="smoke run: N=5, sweep 2,5, batch 2, one round, depths 1,2,5 (unless given explicitly)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")

    for task, help_text, iterations, start in (
        ("edit", "text-guided editing of a real image (Eq. 23)", 50, 600),
        ("style", "style-guided generation (Eq. 24)", 150, 600),
        ("aesthetic", "aesthetic enhancement of a generation or a real image (Eq. 25)", 100, 600),
        ("adversarial", "adversarial generation against an image classifier (Sec. 5.1.4)", 30, None),
    ):
        # the paper's settings: Adam at lr 0.01 on 50 steps, but plain gradient descent at lr 0.1 on 30 for the attack
        steps, lr, optimizer = (30, 0.1, "sgd") if task == "adversarial" else (50, 0.01, "adam")
        where = " (without --model: a digit, with the embedded models)" if task == "edit" else ""
        t = sub.add_parser(task, help=help_text + " on a local diffusers pipeline" + where,
                           description=f"{help_text[0].upper() + help_text[1:]}: SDO (or --strategy) on the latent at "
                           f"--start-t of a local diffusers text-to-image pipeline{where}; writes before/after PNGs, "
                           "the loss curve and metrics.json.")
        t.add_argument("prompt", help="the text prompt (the edit's target for 'edit')")
        if task == "edit":
            t.add_argument("--model", default=None, help="a local diffusers pipeline folder (model_index.json); "
                           "default: the embedded digits DDPM and image-text model (offline, CPU)")
        else:
            t.add_argument("--model", required=True, help="a local diffusers pipeline folder (model_index.json)")
        if task == "adversarial":
            t.add_argument("--classifier", required=True,
                           help="a local transformers image-classification folder (model and image processor)")
            t.add_argument("--target", type=_non_negative_int, default=None, help="class to reach (default: leave the generation's own)")
            t.add_argument("--tau", type=_positive_float, default=0.1, help="L-infinity radius on the latent (default 0.1)")
        else:
            t.add_argument("--clip", required=task != "edit", default=None,
                           help="a local transformers CLIPModel folder, with its tokenizer" +
                           (" (needed with --model)" if task == "edit" else ""))
        if task == "aesthetic":
            t.add_argument("--image", default=None, help="the real image to enhance (default: a generation)")
        if task == "edit":
            source = t.add_mutually_exclusive_group(required=True)
            source.add_argument("--image", default=None, help="the real image to edit (for the embedded digits: white "
                                "ink on black, or dark on light, which is negated)")
            source.add_argument("--digit", type=_non_negative_int, default=None,
                                help="edit this held-out digit of the embedded models' test split (0-296)")
            t.add_argument("--lam", type=_non_negative_float, default=None,
                           help="fidelity weight lambda (default: 0.5 on the embedded digits, an attribute edit; 0.7 "
                           "with --model, as the paper)")
        if task == "style":
            t.add_argument("--reference", required=True, help="the style image")
            t.add_argument("--layer", type=_non_negative_int, default=3, help="CLIP vision layer of the Gram loss (default 3)")
        if task == "aesthetic":
            t.add_argument("--head", required=True, help="aesthetic head weights (.safetensors or a torch state dict)")
        t.add_argument("--strategy", default="sdo", help="gradient strategy (default sdo)")
        t.add_argument("--picard", action="store_true", help="SDO's forward pass by Picard sweeps over all steps "
                       "(ParaDiGMS), warm-started from the previous iteration's trajectory: fewer sequential "
                       "denoiser calls, larger ones; meant for a GPU with batch capacity to spare, slower on a CPU")
        t.add_argument("--start-t", type=_non_negative_int, default=start,
                       help=f"timestep of the optimized latent (default {start or 'x_T, the initial noise'})")
        t.add_argument("--steps", type=_positive_int, default=steps, help=f"sampling steps (default {steps})")
        t.add_argument("--iterations", type=_positive_int, default=iterations,
                       help=f"optimizer steps (default {iterations})")
        t.add_argument("--lr", type=_positive_float, default=lr, help=f"learning rate (default {lr})")
        if task == "adversarial":
            t.add_argument("--optimizer", choices=("sgd", "adam"), default=optimizer,
                           help="sgd: plain gradient descent, the paper's (default); adam")
            t.add_argument("--step-rule", choices=("plain", "sign"), default="plain",
                           help="step on the gradient (plain, default) or on its sign (with sgd: PGD, independent "
                           "of the gradient's scale)")
        t.add_argument("--guidance-scale", type=_positive_float, default=1.0,
                       help="classifier-free guidance (default 1: off); an LCM-distilled UNet embeds it instead")
        t.add_argument("--scheduler", choices=_TASK_SCHEDULERS, default=None,
                       help="sampler, built from the pipeline scheduler's config (default: the pipeline's own where sdo "
                       "supports it, else ddim)" + ("; inverting a real image needs ddim or euler"
                                                    if task in ("edit", "aesthetic") else ""))
        if task != "edit":  # editing a real image draws no noise
            t.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the generation's noise (default 0)")
        t.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                       help="dtype of the frozen parts (default float32; float16 needs a GPU)")
        t.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
        t.add_argument("--checkpoint-vae", action="store_true", help="recompute the VAE decoder in backward")
        t.add_argument("--output", type=_folder, default=None, help=f"folder (default: a fresh sdo-{task}-<time>)")
        t.add_argument("--overwrite", action="store_true", help="write into an --output that is not empty (files of the same names are replaced)")
        t.add_argument("--no-progress", action="store_true", help="no progress bars")

    train = sub.add_parser("train", help="retrain an embedded model", description="Retrain an embedded model.")
    train_sub = train.add_subparsers(dest="model", required=True, parser_class=_Parser)

    def train_parser(name: str, help: str, description: str) -> argparse.ArgumentParser:
        parser = train_sub.add_parser(name, help=help, description=description)
        parser.add_argument("--output", type=_folder, default=None,
                            help="folder (default: a fresh sdo-train-<model>-<time>); never the shipped weights")
        parser.add_argument("--replace-shipped", action="store_true",
                            help="write into the installed package's weights folder, replacing the shipped model")
        parser.add_argument("--overwrite", action="store_true", help="write into an --output that is not empty (files of the same names are replaced)")
        parser.add_argument("--seed", type=_non_negative_int, default=0, help="seed (default 0)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")
        return parser

    digits = train_parser("digits", help="the digits DDPM and classifier (scikit-learn's digits)",
                          description="Train the class-conditional DDPM and the classifier on scikit-learn's digits "
                          "and write the weights and the measured figures (digits_card.json).")
    digits.add_argument("--unet-steps", type=_positive_int, default=None, help="DDPM optimizer steps")
    digits.add_argument("--classifier-epochs", type=_positive_int, default=None, help="classifier epochs")
    digits.add_argument("--eval-samples", type=_positive_int, default=None, help="samples for the quality figure")
    digit_clip = train_parser("digit-clip", help="the image-text model of the embedded text-guided edit",
                              description="Train the digits image tower and the projection of the frozen MiniLM text "
                              "tower contrastively on captioned digits; write digit_clip.safetensors and "
                              "digit_clip_card.json (held-out retrieval).")
    digit_clip.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (default 1500)")
    student = train_parser("student", help="the few-step student of the digits DDPM (ShortFT's shortcut)",
                           description="Distill the few-step student from the digits DDPM's 50-step DDIM trajectories; "
                           "write digits_student.safetensors and digits_student_card.json (its trajectory error "
                           "against the teacher at the segment boundaries).")
    student.add_argument("--train-steps", type=_positive_int, default=None, help="optimizer steps (default 2000)")
    student.add_argument("--trajectories", type=_positive_int, default=None, help="teacher trajectories (default 2048)")
    add_parsers(sub)
    return parser


def _demo(args) -> None:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(
        output=_output(args, "sdo-demo"), seed=args.seed, device=args.device, quick=args.quick,
        samples=args.samples, steps=args.steps, iterations=args.iterations, tau=args.tau, lr=args.lr,
        rules=args.rules, content_weight=args.content_weight,
    )
    run_demo(cfg, progress=not args.no_progress)


def _bench(args) -> None:
    import torch

    from .benchmark import BenchConfig, run_bench

    if args.dtype == "float16" and args.device == "cpu":
        raise UsageError("--dtype float16 needs a GPU (--device cuda): on a CPU half-precision layers are slow or "
                         "missing and overflow to inf; use float32, float64 or bfloat16", "dtype")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = _BENCH_QUICK if args.quick else {}
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else sizes.get(k) for k in _BENCH_QUICK}
    cfg = BenchConfig(
        model=args.model, sweep_repeats=args.sweep_repeats, guidance_scales=args.guidance_scales, params=not args.no_params, memory=not args.no_memory,
        device=args.device, dtype=args.dtype, seed=args.seed, output=_output(args, "sdo-bench"),
        progress=not args.no_progress, **({"strategies": args.strategies} if args.strategies else {}),
        **{k: v for k, v in sizes.items() if v is not None},
    )
    run_bench(cfg)


_BENCH_QUICK = {"steps": 5, "sweep": (2, 5), "batch": 2, "repeats": 1, "depths": (1, 2, 5), "quality_iterations": 2}


def _task(args) -> None:
    import torch

    from . import tasks

    strategy = _check_task(args)  # every option, before anything is created or loaded
    args.output = _output(args, f"sdo-{args.command}")
    if args.command == "edit" and args.model is None:
        _save_task(args, _edit_digits(args, strategy))
        return
    pipe = tasks.load_pipeline(args.model, args.device, getattr(torch, args.dtype))
    if args.command != "adversarial":
        clip, tokenizer = tasks.load_clip(args.clip, args.device, tokenizer=args.command == "edit")
    common = {"steps": args.steps, "iterations": args.iterations, "lr": args.lr, "strategy": strategy,
                  "start_t": args.start_t, "guidance_scale": args.guidance_scale, "scheduler": args.scheduler,
                  "checkpoint_vae": args.checkpoint_vae, "progress": not args.no_progress}
    if args.command == "edit":
        image = tasks.load_image(args.image, pipe.image_size)
        result = tasks.edit(pipe, clip, tokenizer, image, args.prompt, lam=0.7 if args.lam is None else args.lam, **common)
    elif args.command == "style":
        reference = tasks.load_image(args.reference, pipe.image_size)
        result = tasks.style(pipe, clip, reference, args.prompt, layer=args.layer, seed=args.seed, **common)
    elif args.command == "adversarial":
        classifier = tasks.ImageClassifier.from_folder(args.classifier, args.device)
        result = tasks.adversarial(pipe, classifier, args.prompt, target=args.target, tau=args.tau, seed=args.seed,
                                   optimizer=args.optimizer, step_rule=args.step_rule, **common)
    else:
        image = tasks.load_image(args.image, pipe.image_size) if args.image else None
        result = tasks.aesthetic(pipe, clip, args.head, args.prompt, image=image, seed=args.seed, **common)
    _save_task(args, result)


def _check_task(args):
    """The task command's options that can be checked before loading anything; returns its strategy."""
    check_text("prompt", args.prompt)
    strategy = _task_strategy(args)
    if args.dtype == "float16" and args.device == "cpu":
        raise UsageError("--dtype float16 needs a GPU (--device cuda): on a CPU half-precision layers are slow or "
                         "missing and overflow to inf; use float32 or bfloat16", "dtype")
    if args.command == "edit" and args.model is None:
        from .embedded.digits import HELD_OUT

        if args.dtype != "float32" or args.guidance_scale != 1 or args.checkpoint_vae:
            raise UsageError("the embedded digits edit runs in float32, unguided, without a VAE: drop --dtype, "
                             "--guidance-scale and --checkpoint-vae, or pass --model")
        if args.digit is not None and args.digit >= HELD_OUT:
            raise UsageError(f"--digit must be in 0..{HELD_OUT - 1} (the held-out split), got {args.digit}", "digit")
        if args.image is not None and not Path(args.image).is_file():
            raise FileNotFoundError(f"--image {args.image}: no such file")
        return strategy
    if args.command == "edit" and (args.clip is None or args.image is None):
        raise UsageError("editing a pipeline's image (--model) needs --clip and --image (--digit is for the embedded "
                         "digits, without --model)")
    folders = {"model": "pipeline folder", "clip": "CLIP model folder", "classifier": "image classifier folder"}
    for name, what in folders.items():
        path = getattr(args, name, None)
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"--{name} {path}: no such {what}")
    for name in ("image", "reference", "head"):
        path = getattr(args, name, None)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--{name} {path}: {'a folder, not a file' if Path(path).is_dir() else 'no such file'}")
    return strategy


def _task_strategy(args):
    """The tasks' --strategy; with --picard, SDO on a Picard forward pass warm-started from the last iteration."""
    from .picard import Picard
    from .strategies import get_strategy

    if not args.picard:
        return get_strategy(args.strategy)
    if args.strategy != "sdo":
        raise UsageError(f"--picard runs SDO's forward pass: it needs --strategy sdo, got {args.strategy!r}")
    return get_strategy("sdo", picard=Picard(warm_start=True))


def _edit_digits(args, strategy):
    """``sdo edit`` without --model: the embedded digits DDPM and image-text model."""
    from . import tasks
    from .embedded.digits import load_dataset

    if args.digit is not None:  # in range: checked by _check_task
        image = load_dataset("test")[0][args.digit : args.digit + 1]
    else:
        image = tasks.load_digit_image(args.image)
    return tasks.edit_digits(image, args.prompt, lam=0.5 if args.lam is None else args.lam, start_t=args.start_t,
                             steps=args.steps, scheduler=args.scheduler, strategy=strategy, iterations=args.iterations, lr=args.lr,
                             device=args.device, progress=not args.no_progress)


def _save_task(args, result) -> None:
    import json

    from . import report

    out = args.output  # settled by _task before any work
    report.save_grid([("before", result.before), ("after", result.after)], out / "before_after.png", title=args.prompt)
    report.plot_curves({args.strategy: result.optimization.losses}, out / "loss.png", f"sdo {args.command}", "iteration", "loss")
    settings = ("strategy", "steps", "iterations", "lr", "optimizer", "step_rule", "tau", "target", "start_t",
                "guidance_scale", "scheduler", "seed", "lam", "dtype")
    metrics = {"command": args.command, "prompt": args.prompt, **result.metrics, "losses": result.optimization.losses,
               "seconds": result.optimization.seconds,
               "settings": {k: getattr(args, k) for k in settings if k in vars(args)}}
    if result.optimization.picard_runs:
        metrics["picard_sweeps"] = [sweeps for sweeps, _ in result.optimization.picard_runs]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k != "losses"}, indent=2))
    print(f"wrote {out}/before_after.png, loss.png and metrics.json")


def _train_output(args) -> Path:
    """Where ``sdo train`` writes: a fresh folder, ``--output``, or the shipped weights only when asked."""
    from .embedded import weights_dir

    shipped = Path(str(weights_dir()))
    if args.replace_shipped:
        if args.output is not None:
            raise UsageError("give --output or --replace-shipped, not both")
        return shipped
    if args.output is not None and args.output.resolve() == shipped.resolve():
        raise UsageError(f"{args.output} is the package's shipped weights folder: pass --replace-shipped to replace them")
    return _output(args, f"sdo-train-{args.model}")


def _train(args) -> None:
    import json

    output = _train_output(args)
    if args.model == "student":
        from .embedded.student import StudentConfig, train_student

        cfg = StudentConfig(seed=args.seed)
        for name in ("train_steps", "trajectories"):
            if getattr(args, name) is not None:
                setattr(cfg, name, getattr(args, name))
        card = train_student(output, cfg, progress=not args.no_progress)
        print(json.dumps({k: card[k] for k in ("held_out", "seconds")}, indent=2))
        print(f"wrote digits_student.safetensors and digits_student_card.json to {output}")
    elif args.model == "digit-clip":
        from .embedded.digit_clip import DigitCLIPConfig, train_digit_clip

        cfg = DigitCLIPConfig(seed=args.seed, **({"steps": args.steps} if args.steps else {}))
        _, card = train_digit_clip(output, cfg, progress=not args.no_progress)
        print(json.dumps({k: card[k] for k in ("held_out", "seconds")}, indent=2))
        print(f"wrote digit_clip.safetensors and digit_clip_card.json to {output}")
    else:
        _train_digits(args, output)


def _train_digits(args, output: Path) -> None:
    import json

    from .embedded.digits import TrainConfig, train_digits

    cfg = TrainConfig(seed=args.seed)
    for name in ("unet_steps", "classifier_epochs", "eval_samples"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    card = train_digits(output, cfg, progress=not args.no_progress)
    print(json.dumps({k: card[k] for k in ("classifier", "samples", "seconds")}, indent=2))
    print(f"wrote the weights and digits_card.json to {output}")


def _quiet_loading() -> None:
    """--no-progress: no loading bars from diffusers and transformers either."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _one_line(err: BaseException) -> str:
    """The error as one line (an OSError's own text names its file)."""
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the ``sdo`` command: 0 on success; 2 for a user's mistake (:class:`~sdo.UsageError`, a bad path or
    file), printed as one line; 3 when the numbers went non-finite; an internal bug keeps its traceback."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "no_progress", False) or getattr(args, "progress", True) is False:
        _quiet_loading()
    try:
        if args.command == "demo":
            _demo(args)
        elif args.command == "bench":
            _bench(args)
        elif args.command in ("edit", "style", "aesthetic", "adversarial"):
            _task(args)
        elif args.command in ("finetune", "shortft"):
            run_finetune(args)
        elif args.command == "lora":
            run_lora(args)
        else:
            _train(args)
    except (UsageError, OSError) as err:  # a user's mistake (OSError: a path, a file PIL cannot read, a full disk)
        print(f"sdo {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"sdo {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"sdo {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
