"""The ``sdo`` command: ``sdo demo`` (the main job), ``sdo bench``, ``sdo edit | style | aesthetic | adversarial``
(:mod:`sdo.cli.tasks`), ``sdo noise`` (:mod:`sdo.cli.noise`), ``sdo finetune``, ``sdo shortft``, ``sdo lora
scale | merge`` (:mod:`sdo.cli.finetune`), ``sdo train digits | digit-clip | student`` (:mod:`sdo.cli.train`) and
``sdo ui`` (:mod:`sdo.cli.ui`): the parser and one error path."""

from __future__ import annotations

import argparse
import sys

from ..checks import NonFiniteError, UsageError, check_half_on_cpu
from .finetune import add_finetune_parsers, run_finetune, run_lora
from .noise import add_noise_parser, run_noise
from .options import (
    Parser,
    bench_strategies,
    device,
    float_list,
    folder,
    int_list,
    name_list,
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_float,
    positive_int,
    quiet_loading,
    remove_if_empty,
    rule_list,
)
from .tasks import add_task_parsers, run_task
from .train import add_train_parsers, run_train
from .ui import add_ui_parser, run_ui

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``sdo`` command's parser; parsing imports no torch."""
    parser = Parser(prog="sdo", description="Gradient-based control of diffusion sampling (SDO and its baselines).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    demo = sub.add_parser("demo", help="the paper's latent tasks on the embedded digits models (offline, CPU)",
                          description="Adversarial generation, style guidance and the cost table on the embedded "
                          "digits models; writes PNGs, metrics.json and index.html.")
    demo.add_argument("--output", type=folder, default=None, help="report folder (default: a fresh sdo-demo-<time>)")
    demo.add_argument("--overwrite", action="store_true",
                      help="write into an --output that is not empty (files of the same names are replaced)")
    demo.add_argument("--seed", type=non_negative_int, default=0,
                      help="seed of every latent and noise draw (default 0)")
    demo.add_argument("--device", type=device, default="cpu", help="torch device (default cpu)")
    demo.add_argument("--quick", action="store_true", help="a smoke run (4 samples, 10 steps, 4 iterations)")
    demo.add_argument("--samples", type=positive_int, default=8, help="adversarial samples (default 8)")
    demo.add_argument("--steps", type=positive_int, default=30, help="DDIM steps of every chain (default 30)")
    demo.add_argument("--iterations", type=positive_int, default=30, help="adversarial optimization steps (default 30)")
    demo.add_argument("--tau", type=positive_float, default=0.1, help="L-infinity radius around x_T (default 0.1)")
    demo.add_argument("--lr", type=positive_float, default=None,
                      help="one learning rate for every adversarial method (default: each method's tuned one)")
    demo.add_argument("--rules", type=rule_list, default=("plain",),
                      help="adversarial step rules, comma-separated: plain (gradient descent, the paper's; default), "
                      "sign (PGD)")
    demo.add_argument("--content-weight", type=non_negative_float, default=0.3,
                      help="weight of the style task's content term (default 0.3; 0: style alone)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    bench = sub.add_parser("bench", help="cost and fidelity of every gradient strategy (the paper's Table 3)",
                           description="Seconds, peak memory, saved bytes, denoiser calls and gradient fidelity of one "
                           "gradient per strategy, a sweep over N and gradient norms against depth (Fig. 11a); writes "
                           "bench.json, bench.md, PNGs and index.html.")
    bench.add_argument("--model", default="digits",
                       help="'digits' (the embedded UNet, default) or a diffusers config JSON of a UNet2DModel, "
                       "UNet2DConditionModel (SD, SDXL), SD3Transformer2DModel or FluxTransformer2DModel, built with "
                       "random weights (real-size costs on a GPU: benchmarks/configs)")
    bench.add_argument("--lora", type=non_negative_int, default=0,
                       help="the weight-gradient rows train a LoRA of this rank on the attention, as fine-tuning "
                       "does (default 0: every weight)")
    bench.add_argument("--block-checkpointing", action="store_true",
                       help="the denoiser's own gradient checkpointing inside its blocks "
                       "(diffusers' enable_gradient_checkpointing)")
    bench.add_argument("--no-fidelity", action="store_true",
                       help="skip the cosines to Full and the norms by depth (they need Full's gradient, which does "
                       "not fit in memory at SDXL/FLUX size)")
    bench.add_argument("--steps", type=positive_int, default=None, help="N of the main table (default 50)")
    bench.add_argument("--batch", type=positive_int, default=None, help="batch size (default 4)")
    bench.add_argument("--sweep", type=int_list, default=None,
                       help="comma-separated N values of the sweep (default 10,25,50,100,200; 'none' to skip)")
    bench.add_argument("--strategies", type=name_list, default=None,
                       help="comma-separated subset of: " + ", ".join(bench_strategies()))
    bench.add_argument("--repeats", type=positive_int, default=None, help="timed rounds at --steps (default 3)")
    bench.add_argument("--sweep-repeats", type=positive_int, default=1, help="timed rounds at other N (default 1)")
    bench.add_argument("--depths", type=int_list, default=None,
                       help="backpropagation depths of the gradient-norm plot (default 1,2,5,10,20,50)")
    bench.add_argument("--no-params", action="store_true", help="skip the weight-gradient (+params) rows")
    bench.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    bench.add_argument("--guidance-scales", type=float_list, default=(0.05, 0.2),
                       help="FreeDoM/UGD step sizes of the quality comparison (default 0.05,0.2; 'none' to skip)")
    bench.add_argument("--quality-iterations", type=non_negative_int, default=None,
                       help="Adam steps of SDO in the quality comparison (default 10; 0 to skip)")
    bench.add_argument("--device", type=device, default="cpu", help="torch device (default cpu)")
    bench.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32",
                       help="dtype of the model and the latent (default float32; float16 needs a GPU)")
    bench.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    bench.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed of the latent, the weights and random draws")
    bench.add_argument("--output", type=folder, default=None, help="folder (default: a fresh sdo-bench-<time>)")
    bench.add_argument("--overwrite", action="store_true",
                       help="write into an --output that is not empty (files of the same names are replaced)")
    bench.add_argument("--quick", action="store_true",
                       help="smoke run: N=5, sweep 2,5, batch 2, one round, depths 1,2,5 (unless given explicitly)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")

    add_task_parsers(sub)
    add_noise_parser(sub)
    add_train_parsers(sub)
    add_finetune_parsers(sub)
    add_ui_parser(sub)
    return parser


def _demo(args) -> None:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(
        output=output_folder(args, "sdo-demo"), seed=args.seed, device=args.device, quick=args.quick,
        samples=args.samples, steps=args.steps, iterations=args.iterations, tau=args.tau, lr=args.lr,
        rules=args.rules, content_weight=args.content_weight,
    )
    run_demo(cfg, progress=not args.no_progress)


def _bench(args) -> None:
    import torch

    from .bench import BenchConfig, run_bench

    check_half_on_cpu("--dtype", args.dtype, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = _BENCH_QUICK if args.quick else {}
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else sizes.get(k) for k in _BENCH_QUICK}
    cfg = BenchConfig(
        model=args.model, sweep_repeats=args.sweep_repeats, guidance_scales=args.guidance_scales,
        params=not args.no_params, memory=not args.no_memory, lora=args.lora,
        block_checkpointing=args.block_checkpointing, fidelity=not args.no_fidelity,
        device=args.device, dtype=args.dtype, seed=args.seed, output=output_folder(args, "sdo-bench"),
        progress=not args.no_progress, **({"strategies": args.strategies} if args.strategies else {}),
        **{k: v for k, v in sizes.items() if v is not None},
    )
    run_bench(cfg)


_BENCH_QUICK = {"steps": 5, "sweep": (2, 5), "batch": 2, "repeats": 1, "depths": (1, 2, 5), "quality_iterations": 2}


def _one_line(err: BaseException) -> str:
    """The error as one line (an OSError's own text names its file)."""
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the ``sdo`` command: 0 on success; 2 for a user's mistake (:class:`~sdo.UsageError`, a bad path or
    file), printed as one line; 3 when the numbers went non-finite; an internal bug keeps its traceback."""
    args = build_parser().parse_args(argv)
    if getattr(args, "no_progress", False) or getattr(args, "progress", True) is False:
        quiet_loading()
    done = False
    try:
        if args.command == "demo":
            _demo(args)
        elif args.command == "bench":
            _bench(args)
        elif args.command in ("edit", "style", "aesthetic", "adversarial"):
            run_task(args)
        elif args.command == "noise":
            run_noise(args)
        elif args.command == "ui":
            run_ui(args)
        elif args.command in ("finetune", "shortft"):
            run_finetune(args)
        elif args.command == "lora":
            run_lora(args)
        else:
            run_train(args)
        done = True
    except (UsageError, OSError) as err:  # a user's mistake (OSError: a path, a file PIL cannot read, a full disk)
        print(f"sdo {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"sdo {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"sdo {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if not done:
            remove_if_empty(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
