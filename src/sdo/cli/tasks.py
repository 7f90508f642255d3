"""``sdo edit | style | aesthetic | adversarial``: the paper's latent tasks (:mod:`sdo.recipes.latent_tasks`) on a
local diffusers pipeline, or ``sdo edit`` on the embedded digits. Every option is checked before anything is
created or loaded."""

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

__all__ = ["TASKS", "add_task_parsers", "run_task"]

def _edit_options(t) -> None:
    t.add_argument("--model", default=None, help="a local diffusers pipeline folder (model_index.json); default: the "
                   "embedded digits DDPM and image-text model (offline, CPU)")
    t.add_argument("--clip", default=None, help="a local transformers CLIPModel folder, with its tokenizer (needed "
                   "with --model)")
    source = t.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", default=None, help="the real image to edit (for the embedded digits: white ink on "
                        "black, or dark on light, which is negated)")
    source.add_argument("--digit", type=non_negative_int, default=None,
                        help="edit this held-out digit of the embedded models' test split (0-296)")
    t.add_argument("--lam", type=non_negative_float, default=None, help="fidelity weight lambda (default: 0.5 on the "
                   "embedded digits, an attribute edit; 0.7 with --model, as the paper)")


def _style_options(t) -> None:
    _pipeline_and_clip(t)
    t.add_argument("--reference", required=True, help="the style image")
    t.add_argument("--layer", type=non_negative_int, default=3, help="CLIP vision layer of the Gram loss (default 3)")


def _aesthetic_options(t) -> None:
    _pipeline_and_clip(t)
    t.add_argument("--image", default=None, help="the real image to enhance (default: a generation)")
    t.add_argument("--head", required=True, help="aesthetic head weights (.safetensors or a torch state dict)")


def _adversarial_options(t) -> None:
    t.add_argument("--model", required=True, help="a local diffusers pipeline folder (model_index.json)")
    t.add_argument("--classifier", required=True,
                   help="a local transformers image-classification folder (model and image processor)")
    t.add_argument("--target", type=non_negative_int, default=None,
                   help="class to reach (default: leave the generation's own)")
    t.add_argument("--tau", type=positive_float, default=0.1, help="L-infinity radius on the latent (default 0.1)")
    t.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="sgd: plain gradient descent, the paper's (default); adam")
    t.add_argument("--step-rule", choices=("plain", "sign"), default="plain", help="step on the gradient (plain, "
                   "default) or on its sign (with sgd: PGD, independent of the gradient's scale)")


def _pipeline_and_clip(t) -> None:
    t.add_argument("--model", required=True, help="a local diffusers pipeline folder (model_index.json)")
    t.add_argument("--clip", required=True, help="a local transformers CLIPModel folder, with its tokenizer")


# name -> (what it does, its own options, the paper's iterations, steps, lr, start timestep)
TASKS = {
    "edit": ("text-guided editing of a real image (Eq. 23)", _edit_options, 50, 50, 0.01, 600),
    "style": ("style-guided generation (Eq. 24)", _style_options, 150, 50, 0.01, 600),
    "aesthetic": ("aesthetic enhancement of a generation or a real image (Eq. 25)", _aesthetic_options, 100, 50, 0.01,
                  600),
    # the attack: plain gradient descent at lr 0.1 on 30 steps from x_T, as the paper
    "adversarial": ("adversarial generation against an image classifier (Sec. 5.1.4)", _adversarial_options, 30, 30,
                    0.1, None),
}


def add_task_parsers(sub) -> None:
    """Add the four task commands to the ``sdo`` command's subparsers."""
    for task, (what, options, iterations, steps, lr, start) in TASKS.items():
        where = " (without --model: a digit, with the embedded models)" if task == "edit" else ""
        t = sub.add_parser(task, help=what + " on a local diffusers pipeline" + where,
                           description=f"{what[0].upper() + what[1:]}: SDO (or --strategy) on the latent at --start-t "
                           f"of a local diffusers text-to-image pipeline{where}; writes before/after PNGs, the loss "
                           "curve and metrics.json.")
        t.add_argument("prompt", help="the text prompt (the edit's target for 'edit')")
        options(t)
        t.add_argument("--strategy", default="sdo", help="gradient strategy (default sdo)")
        t.add_argument("--picard", action="store_true", help="SDO's forward pass by Picard sweeps over all steps "
                       "(ParaDiGMS), warm-started from the previous iteration's trajectory: fewer sequential denoiser "
                       "calls, larger ones; meant for a GPU with batch capacity to spare, slower on a CPU")
        t.add_argument("--start-t", type=non_negative_int, default=start,
                       help=f"timestep of the optimized latent (default {start or 'x_T, the initial noise'})")
        t.add_argument("--steps", type=positive_int, default=steps, help=f"sampling steps (default {steps})")
        t.add_argument("--iterations", type=positive_int, default=iterations,
                       help=f"optimizer steps (default {iterations})")
        t.add_argument("--lr", type=positive_float, default=lr, help=f"learning rate (default {lr})")
        t.add_argument("--guidance-scale", type=positive_float, default=1.0,
                       help="classifier-free guidance (default 1: off); an LCM-distilled UNet embeds it instead, as "
                       "FLUX.1-dev takes it as its guidance input")
        t.add_argument("--true-cfg-scale", type=positive_float, default=None,
                       help="FLUX only: FluxPipeline's true classifier-free guidance on the empty prompt, beside "
                       "--guidance-scale (default: off)")
        t.add_argument("--drop-t5", action="store_true",
                       help="SD3 only: run without its T5 text encoder (zeros in its place, as its pipeline allows)")
        inverts = "; inverting a real image needs ddim or euler" if task in ("edit", "aesthetic") else ""
        t.add_argument("--scheduler", choices=TASK_SCHEDULERS, default=None, help="sampler, built from the pipeline "
                       f"scheduler's config (default: the pipeline's own where sdo supports it, else ddim){inverts}")
        if task != "edit":  # editing a real image draws no noise
            t.add_argument("--seed", type=non_negative_int, default=0,
                           help="seed of the generation's noise (default 0)")
        t.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                       help="dtype of the frozen parts (default float32; float16 needs a GPU)")
        t.add_argument("--device", type=device, default="cpu", help="torch device (default cpu)")
        t.add_argument("--checkpoint-vae", action="store_true", help="recompute the VAE decoder in backward")
        t.add_argument("--output", type=folder, default=None, help=f"folder (default: a fresh sdo-{task}-<time>)")
        t.add_argument("--overwrite", action="store_true",
                       help="write into an --output that is not empty (files of the same names are replaced)")
        t.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_task(args) -> None:
    import torch

    from .. import backbones
    from ..recipes import latent_tasks as tasks

    strategy = _check(args)  # every option, before anything is created or loaded
    args.output = output_folder(args, f"sdo-{args.command}")
    if args.command == "edit" and args.model is None:
        _save(args, _edit_digits(args, strategy))
        return
    pipe = backbones.load_pipeline(args.model, args.device, getattr(torch, args.dtype),
                                   true_cfg_scale=args.true_cfg_scale, drop_t5=args.drop_t5)
    if args.command != "adversarial":
        clip, tokenizer = backbones.load_clip(args.clip, args.device, tokenizer=args.command == "edit")
    common = {"steps": args.steps, "iterations": args.iterations, "lr": args.lr, "strategy": strategy,
              "start_t": args.start_t, "guidance_scale": args.guidance_scale, "scheduler": args.scheduler,
              "checkpoint_vae": args.checkpoint_vae, "progress": not args.no_progress}
    if args.command == "edit":
        image = backbones.load_image(args.image, pipe.image_size)
        lam = 0.7 if args.lam is None else args.lam
        result = tasks.edit(pipe, clip, tokenizer, image, args.prompt, lam=lam, **common)
    elif args.command == "style":
        reference = backbones.load_image(args.reference, pipe.image_size)
        result = tasks.style(pipe, clip, reference, args.prompt, layer=args.layer, seed=args.seed, **common)
    elif args.command == "adversarial":
        classifier = backbones.ImageClassifier.from_folder(args.classifier, args.device)
        result = tasks.adversarial(pipe, classifier, args.prompt, target=args.target, tau=args.tau, seed=args.seed,
                                   optimizer=args.optimizer, step_rule=args.step_rule, **common)
    else:
        image = backbones.load_image(args.image, pipe.image_size) if args.image else None
        result = tasks.aesthetic(pipe, clip, args.head, args.prompt, image=image, seed=args.seed, **common)
    _save(args, result)


def _check(args):
    """The task command's options that can be checked before loading anything; returns its strategy."""
    check_text("prompt", args.prompt)
    strategy = _strategy(args)
    check_half_on_cpu("--dtype", args.dtype, args.device)
    if args.command == "edit" and args.model is None:
        from ..embedded.digits import HELD_OUT

        if (args.dtype != "float32" or args.guidance_scale != 1 or args.checkpoint_vae or args.true_cfg_scale
                or args.drop_t5):
            raise UsageError("the embedded digits edit runs in float32, unguided, without a VAE or text encoders: "
                             "drop --dtype, --guidance-scale, --true-cfg-scale, --drop-t5 and --checkpoint-vae, or "
                             "pass --model")
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
            raise FileNotFoundError(f"--{name} {path}: "
                                    f"{'a folder, not a file' if Path(path).is_dir() else 'no such file'}")
    return strategy


def _strategy(args):
    """The tasks' --strategy; with --picard, SDO on a Picard forward pass warm-started from the last iteration."""
    from ..gradients import get_strategy
    from ..picard import Picard

    if not args.picard:
        return get_strategy(args.strategy)
    if args.strategy != "sdo":
        raise UsageError(f"--picard runs SDO's forward pass: it needs --strategy sdo, got {args.strategy!r}")
    return get_strategy("sdo", picard=Picard(warm_start=True))


def _edit_digits(args, strategy):
    """``sdo edit`` without --model: the embedded digits DDPM and image-text model."""
    from ..embedded.digits import load_dataset
    from ..recipes import latent_tasks as tasks

    if args.digit is not None:  # in range: checked by _check
        image = load_dataset("test")[0][args.digit : args.digit + 1]
    else:
        image = tasks.load_digit_image(args.image)
    return tasks.edit_digits(image, args.prompt, lam=0.5 if args.lam is None else args.lam, start_t=args.start_t,
                             steps=args.steps, scheduler=args.scheduler, strategy=strategy, iterations=args.iterations,
                             lr=args.lr, device=args.device, progress=not args.no_progress)


def _save(args, result) -> None:
    settings = ("strategy", "steps", "iterations", "lr", "optimizer", "step_rule", "tau", "target", "start_t",
                "guidance_scale", "true_cfg_scale", "scheduler", "seed", "lam", "dtype")
    metrics = result.save(args.output, args.command, args.prompt, args.strategy,
                          {k: getattr(args, k) for k in settings if k in vars(args)})
    print(json.dumps({k: v for k, v in metrics.items() if k != "losses"}, indent=2))
    print(f"wrote {args.output}/before_after.png, loss.png and metrics.json")
