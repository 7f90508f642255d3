"""``sdo noise``: the initial noise of a few-step chain optimized against weighted rewards
(:mod:`sdo.recipes.noise`: ReNO's and DNO's noise optimization), on the embedded digits or a local pipeline. Every
option is checked before anything is created or loaded."""

from __future__ import annotations

import json
from pathlib import Path

from ..checks import UsageError, check_half_on_cpu, check_text
from .options import (
    TASK_SCHEDULERS,
    device,
    folder,
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_float,
    positive_int,
)

__all__ = ["add_noise_parser", "run_noise"]


def add_noise_parser(sub) -> None:
    t = sub.add_parser("noise", help="optimize the initial noise of a few-step model against weighted rewards (ReNO, "
                       "DNO), on the embedded digits or a local pipeline",
                       description="Noise optimization (ReNO, Eyring et al. 2024; DNO, Tang et al. 2025): Adam on the "
                       "initial noise of a few-step chain to raise a weighted sum of rewards, with ReNO's norm prior "
                       "or DNO's probability regularizer keeping it Gaussian; writes before/after PNGs, the loss "
                       "curve and metrics.json (with the judge's reading on the digits, and how Gaussian the noise "
                       "stayed).")
    t.add_argument("--reward", default=None, help="NAME[:weight],... summed: digits: class, ink (default class); "
                   "pipeline: clip, pickscore, aesthetic (default pickscore)")
    t.add_argument("--target", type=non_negative_int, default=3, help="digits: the class rewarded (default 3)")
    t.add_argument("--count", type=positive_int, default=8, help="digits: noises optimized at once (default 8)")
    t.add_argument("--model", default=None, help="a local diffusers pipeline folder (an LCM or turbo model at 1-4 "
                   "steps, or any other); default: the embedded digits DDPM")
    t.add_argument("--prompt", default=None, help="pipeline: the prompt (required with --model)")
    t.add_argument("--clip", default=None, help="pipeline: a CLIP folder (--reward clip; ViT-L/14 for aesthetic)")
    t.add_argument("--pickscore", default=None, help="pipeline: the PickScore model's folder (--reward pickscore)")
    t.add_argument("--head", default=None, help="pipeline: the LAION aesthetic MLP file (--reward aesthetic)")
    t.add_argument("--regularizer", choices=("none", "reno", "dno"), default="none",
                   help="keep the noise Gaussian: reno (ReNO's norm prior, weight 0.01), dno (DNO's probability "
                   "regularizer, weight 1) or none (default)")
    t.add_argument("--reg-weight", type=non_negative_float, default=None,
                   help="the regularizer's weight (default: its paper's)")
    t.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: 10 on the digits, 4 "
                   "with --model)")
    t.add_argument("--iterations", type=positive_int, default=30, help="optimizer steps (default 30)")
    t.add_argument("--lr", type=positive_float, default=0.05, help="Adam's learning rate (default 0.05)")
    t.add_argument("--strategy", default="full", help="gradient strategy (default full: the chain is short)")
    t.add_argument("--guidance-scale", type=positive_float, default=1.0, help="pipeline: classifier-free guidance "
                   "(default 1: off; an LCM-distilled UNet embeds it)")
    t.add_argument("--scheduler", choices=TASK_SCHEDULERS, default=None,
                   help="pipeline: sampler (default: the pipeline's own where sdo supports it)")
    t.add_argument("--seed", type=non_negative_int, default=0, help="seed of the initial noise (default 0)")
    t.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="pipeline: dtype of the frozen parts (default float32; float16 needs a GPU)")
    t.add_argument("--device", type=device, default="cpu", help="torch device (default cpu)")
    t.add_argument("--checkpoint-vae", action="store_true", help="pipeline: recompute the VAE decoder in backward")
    t.add_argument("--output", type=folder, default=None, help="folder (default: a fresh sdo-noise-<time>)")
    t.add_argument("--overwrite", action="store_true",
                   help="write into an --output that is not empty (files of the same names are replaced)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check(args):
    """Every option that can be checked before loading anything; returns the strategy."""
    from ..gradients import check_latent_gradient, get_strategy
    from ..recipes.noise import noise_regularizer

    strategy = get_strategy(args.strategy)
    check_latent_gradient(strategy)
    noise_regularizer(args.regularizer, args.reg_weight)
    check_half_on_cpu("--dtype", args.dtype, args.device)
    if args.model is None:
        from ..objectives.rewards import digits_reward_terms

        digits_reward_terms(args.reward or "class")
        if args.target > 9:
            raise UsageError(f"--target must be a digit 0-9, got {args.target}", "target")
        given = [f"--{k.replace('_', '-')}" for k in ("prompt", "clip", "pickscore", "head", "scheduler")
                 if getattr(args, k) is not None] + (["--dtype"] if args.dtype != "float32" else [])
        if given or args.guidance_scale != 1 or args.checkpoint_vae:
            raise UsageError(f"{', '.join(given) or 'these options'}: for a pipeline (--model); the embedded digits "
                             "run unguided in float32 without a VAE or prompts")
        return strategy
    from ..backbones.rewards import check_reward

    if args.prompt is None:
        raise UsageError("--model needs --prompt", "prompt")
    check_text("prompt", args.prompt)
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such pipeline folder")
    check_reward(args.reward or "pickscore", clip=args.clip, pickscore=args.pickscore, head=args.head)
    return strategy


def run_noise(args) -> None:
    import torch

    from .. import backbones
    from ..recipes.noise import optimize_noise, optimize_noise_digits

    strategy = _check(args)
    args.output = output_folder(args, "sdo-noise")
    common = {"regularizer": args.regularizer, "weight": args.reg_weight, "iterations": args.iterations,
              "lr": args.lr, "strategy": strategy, "seed": args.seed, "progress": not args.no_progress}
    if args.model is None:
        result = optimize_noise_digits(args.reward or "class", args.target, count=args.count,
                                       steps=args.steps or 10, device=args.device, **common)
        title = f"digits, reward {args.reward or 'class'} (target {args.target})"
    else:
        pipe = backbones.load_pipeline(args.model, args.device, getattr(torch, args.dtype))
        reward = backbones.load_reward(args.reward or "pickscore", clip=args.clip, pickscore=args.pickscore,
                                       head=args.head, device=args.device)
        result = optimize_noise(pipe, reward, args.prompt, steps=args.steps or 4, guidance_scale=args.guidance_scale,
                                scheduler=args.scheduler, checkpoint_vae=args.checkpoint_vae, **common)
        title = args.prompt
    settings = {k: getattr(args, k) for k in ("reward", "target", "count", "model", "prompt", "steps", "iterations",
                                               "lr", "strategy", "regularizer", "reg_weight", "seed")}
    metrics = result.save(args.output, "noise", args.prompt, "loss (minus the reward)", settings,
                          title=f"{title}, regularizer {args.regularizer}")
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("losses", "penalties")}, indent=2))
    print(f"wrote {args.output}/before_after.png, loss.png and metrics.json")
