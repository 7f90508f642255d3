"""``sdo finetune``, ``sdo shortft`` and ``sdo lora scale|merge``: the command-line side of :mod:`sdo.finetuning`,
:mod:`sdo.finetuning.shortft` and :mod:`sdo.finetuning.lora`. ``sdo shortft`` is ``sdo finetune --strategy shortft``.

``sdo finetune --config run.toml --strategy sdo`` reads a JSON or TOML file whose keys are
:class:`~sdo.FinetuneConfig` fields and the task's options (``task``, ``reward``, ``target``, ``labels``,
``model``, ``prompts``, ``clip``, ``head``); flags override the file. The options are saved in the run folder
(``command.json``), so ``sdo finetune --output RUN --resume`` continues a run with the options it was started
with (flags given with ``--resume`` override them, e.g. a larger ``--updates``). Parsing imports no torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from ..checks import UsageError, check_choice, check_int, check_number, check_text

__all__ = ["add_finetune_parsers", "load_config", "run_finetune", "run_lora"]

# FinetuneConfig's fields by how the command line parses them (a test keeps this list equal to the dataclass)
_INT = ("k", "segments", "steps", "updates", "batch_size", "accumulation", "rank", "warmup", "seed", "checkpoint_every",
        "keep_checkpoints", "sample_every", "sample_count", "eval_count", "max_nonfinite", "guard_every", "guard_count",
        "guard_patience")
_FLOAT = ("eta", "lr", "weight_decay", "regularizer", "pretrain_weight")
_OPTIONAL_FLOAT = ("guidance_scale", "max_grad_norm", "alpha", "time_budget")
_TUPLE = {"betas": float, "target_modules": str, "eval_scales": float}
_CHOICES = {"base_dtype": ("float32", "bfloat16", "float16")}
_FLAGS = ("resume", "tensorboard", "cpu", "stop_on_hacking", "block_checkpointing")
_TASK_KEYS = ("task", "reward", "judge", "target", "labels", "ink_weight", "model", "prompts", "clip", "pickscore",
              "head", "few_step")
# diffusers.optimization.SchedulerType's names, spelled out so that parsing imports no torch (a test keeps them equal)
_LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                  "piecewise_constant")


# help of each FinetuneConfig field; "(default X)" is kept equal to the dataclass's defaults by a test
_HELP = {
    "k": "truncated: denoiser calls that keep a graph (DRaFT-K; 1 is AlignProp-1) (default 1)",
    "segments": "shortft: segments of the chain, one stacked LoRA each (default 4)",
    "steps": "sampler steps N (default 50)",
    "updates": "optimizer updates in all, a resumed run's included (default 100)",
    "batch_size": "samples per micro-batch, over all processes (default 8)",
    "accumulation": "micro-batches per update (default 1)",
    "rank": "LoRA rank (default 4)",
    "warmup": "learning-rate warm-up, in updates; needs --lr-scheduler other than constant (default 0)",
    "seed": "seed of the LoRA init, the noise, the conditions and random steps (default 0)",
    "checkpoint_every": "updates between checkpoints, and one at the end (default 10)",
    "keep_checkpoints": "newest checkpoints kept (default 2)",
    "sample_every": "updates between sample grids at fixed seeds; 0: none (default 10)",
    "sample_count": "samples per grid (default 16)",
    "eval_count": "samples scored at the end, per LoRA scale (default 64)",
    "max_nonfinite": "non-finite updates in a row that stop the run (default 5)",
    "guard_every": "updates between reward-hacking guard checks; 0: no guard (default 10)",
    "guard_count": "samples per guard check, >= 2 (default 64)",
    "guard_patience": "failed guard checks in a row that stop a run with --stop-on-hacking (default 2)",
    "eta": "DDIM's stochasticity, in [0, 1] (default 0)",
    "lr": "AdamW learning rate, > 0 (default 0.001)",
    "weight_decay": "AdamW weight decay, >= 0 (default 0.0001)",
    "regularizer": "weight of the penalty on the tuned model's drift from the base (DRaFT+), >= 0 (default 0)",
    "pretrain_weight": "weight of ReFL's pre-training loss: the diffusion loss on the task's real data (the digits' "
                       "training images) beside the reward, >= 0 (default 0)",
    "guidance_scale": "classifier-free guidance scale, or none: the conditional model alone (default none)",
    "max_grad_norm": "clip the gradient's global norm to this, or none: no clipping (default 1)",
    "alpha": "LoRA alpha, or none: the rank, a scale of 1 (default none)",
    "time_budget": "stop once the updates have taken this many seconds, or none (default none)",
    "betas": "AdamW's two betas, comma-separated, each in [0, 1) (default 0.9,0.999)",
    "target_modules": "module names (or name suffixes) that get a LoRA, comma-separated "
                      "(default to_q,to_k,to_v,to_out.0)",
    "eval_scales": "LoRA scales of the final evaluation, comma-separated; 0 is the base model (default 0,0.5,1)",
    "strategy": "gradient method: a registered one that trains weights (sdo.finetuning.methods(); an unknown name "
                "is refused with the list) or shortft (default sdo)",
    "base_dtype": "dtype of the frozen base weights; the LoRA stays float32; float16 needs a GPU (default float32)",
    "lr_scheduler": "diffusers learning-rate schedule: " + ", ".join(_LR_SCHEDULERS) + " (default constant)",
    "resume": "continue the run in --output from its last checkpoint, with the options it was started with",
    "tensorboard": "also log to TensorBoard, in --output/tensorboard (needs the tensorboard package)",
    "cpu": "stay on the CPU even when a GPU is visible",
    "block_checkpointing": "recompute inside the denoiser's blocks in backward (diffusers' "
                           "enable_gradient_checkpointing): the same gradient, less memory at SDXL/SD3/FLUX size",
    "stop_on_hacking": "stop when the guard fails --guard-patience checks in a row (the last passing LoRA is kept "
                       "either way)",
}
# options a resumed run may change: how long it runs and what it reports; any other must equal the saved one
_RESUMABLE = {"updates", "time_budget", "checkpoint_every", "keep_checkpoints", "sample_every", "sample_count",
              "progress", "tensorboard", "cpu", "resume", "output", "config", "block_checkpointing"}


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _finite(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _optional_float(text: str):
    return None if text.strip().lower() == "none" else _number(text)


def _tuple(kind):
    def parse(text: str) -> tuple:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}")
        try:
            return tuple(kind(v) for v in values)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected comma-separated {_KINDS.get(kind, 'finite numbers')}, got "
                                             f"{text!r}") from None
    return parse


_KINDS = {int: "integers", float: "numbers", str: "names"}


def add_finetune_parsers(sub) -> None:
    """Add ``finetune``, ``shortft`` and ``lora`` to the ``sdo`` command's subparsers."""
    _finetune_arguments(sub.add_parser(
        "finetune", help="LoRA reward fine-tuning through the sampler (SDO, AlignProp, DRaFT, ShortFT)",
        description="Fine-tune a LoRA on a differentiable reward. Without --model: the embedded digits DDPM toward a "
        "target class. Runs under `accelerate launch` as well.", argument_default=argparse.SUPPRESS))
    _finetune_arguments(sub.add_parser(
        "shortft", help="ShortFT: LoRA fine-tuning through a chain shortened by a few-step model",
        description="ShortFT (Guo et al., ICCV 2025): per-segment stacked LoRAs trained end to end through a chain "
        "whose later segments are crossed by a frozen few-step model; progressive stages. `sdo finetune --strategy "
        "shortft`, with the same options. Without --model: the embedded digits DDPM and its shipped few-step student.",
        argument_default=argparse.SUPPRESS))
    _lora_parsers(sub)


def _finetune_arguments(ft) -> None:
    ft.add_argument("--config", type=Path, help="JSON or TOML file of options, keys as the flags with _ (flags "
                    "override it)")
    ft.add_argument("--output", type=Path, help="run folder (required here or in the config); a folder holding a "
                    "run only with --resume")
    for name in _INT:
        ft.add_argument("--" + name.replace("_", "-"), dest=name, type=int, help=_HELP[name])
    for name in _FLOAT:
        ft.add_argument("--" + name.replace("_", "-"), dest=name, type=_number, help=_HELP[name])
    for name in _OPTIONAL_FLOAT:
        ft.add_argument("--" + name.replace("_", "-"), dest=name, type=_optional_float, help=_HELP[name])
    for name, kind in _TUPLE.items():
        ft.add_argument("--" + name.replace("_", "-"), dest=name, type=_tuple(kind), help=_HELP[name])
    for name, choices in _CHOICES.items():
        ft.add_argument("--" + name.replace("_", "-"), dest=name, choices=choices, help=_HELP[name])
    ft.add_argument("--strategy", dest="strategy", help=_HELP["strategy"])
    ft.add_argument("--lr-scheduler", dest="lr_scheduler", choices=_LR_SCHEDULERS, help=_HELP["lr_scheduler"])
    for name in _FLAGS:
        ft.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", help=_HELP[name])
    ft.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    ft.add_argument("--no-progressive", dest="progressive", action="store_false",
                    help="shortft: train every LoRA on the stage-1 chain throughout (default: progressive stages)")
    task = ft.add_argument_group("task")
    task.add_argument("--task", choices=("digits", "pipeline"), help="default: digits without --model")
    task.add_argument("--reward", help="NAME[:weight],... summed: digits: class, ink (default class); pipeline: clip, "
                      "pickscore, aesthetic (default clip; hpsv2 and imagereward say why not)")
    task.add_argument("--judge", help="pipeline: NAME[:weight],... of rewards read on the final samples beside the "
                      "reward (judge_reward in summary.json), e.g. clip when tuning on pickscore; the digits have "
                      "their k-NN judge")
    task.add_argument("--target", type=int, help="digits: the class rewarded (default 3)")
    task.add_argument("--labels", type=_tuple(int), help="digits: classes to condition on (default: unconditional)")
    task.add_argument("--ink-weight", dest="ink_weight", type=_number, help="digits: weight of the ink term of "
                      "--reward class+ink (default 0.1)")
    task.add_argument("--model", help="a local diffusers pipeline folder")
    task.add_argument("--prompts", help="pipeline: a text file, one prompt per line, or prompts separated by |")
    task.add_argument("--clip", help="pipeline: a local CLIP model folder (--reward clip; CLIP ViT-L/14 for aesthetic)")
    task.add_argument("--pickscore", help="pipeline: the PickScore model's local folder (--reward pickscore)")
    task.add_argument("--head", help="pipeline: aesthetic head (safetensors) for --reward aesthetic")
    task.add_argument("--few-step", dest="few_step", help="shortft, pipeline: a diffusers folder of the few-step "
                      "model (the pipeline's denoiser with e.g. a Hyper-SD LoRA fused in and saved)")


def _lora_parsers(sub) -> None:
    lora = sub.add_parser("lora", help="scale or merge LoRA folders", description="LoRA arithmetic on saved folders.")
    lora_sub = lora.add_subparsers(dest="action", required=True)
    scale = lora_sub.add_parser("scale", help="theta + alpha * delta: a LoRA whose update is scaled by alpha")
    scale.add_argument("source", type=Path, help="a LoRA folder (saved by sdo finetune or diffusers/peft)")
    scale.add_argument("output", type=Path, help="the new LoRA folder (never the source)")
    scale.add_argument("--alpha", type=_finite, required=True, help="the factor on the LoRA's update (0: none of it)")
    scale.add_argument("--force", action="store_true", help="replace an existing output folder (never a source)")
    merge = lora_sub.add_parser("merge", help="theta + sum_i w_i delta_i: several LoRAs as one (exact)")
    merge.add_argument("sources", type=Path, nargs="+", help="LoRA folders of the same base model")
    merge.add_argument("--weights", type=_tuple(_finite), required=True,
                       help="one finite weight per source, comma-separated")
    merge.add_argument("--output", type=Path, required=True, help="the merged LoRA folder (never a source)")
    merge.add_argument("--force", action="store_true", help="replace an existing output folder (never a source)")


def load_config(path: Path) -> dict:
    """A config file as a dict: ``.toml`` (tomllib) or ``.json``; a file that does not parse is a
    :class:`~sdo.UsageError` naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    if path.suffix not in (".toml", ".json"):
        raise UsageError(f"{path}: the config must be .toml or .json")
    try:
        if path.suffix == ".toml":
            import tomllib

            values = tomllib.loads(path.read_text())
        else:
            values = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise UsageError(f"{path}: not valid {path.suffix[1:].upper()}: {err}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a table of options, got {type(values).__name__}")
    return values


def _task_kind(options: dict) -> str:
    """--task, or what the options imply: a pipeline with --model, else the embedded digits."""
    return options.get("task") or ("pipeline" if options.get("model") else "digits")


def _check_task_options(options: dict) -> None:
    """The task's options, checked before anything is written or loaded."""
    kind = _task_kind(options)
    check_choice("task", kind, ("digits", "pipeline"))
    if kind == "digits":
        from ..objectives.rewards import digits_reward_terms

        digits_reward_terms(options.get("reward", "class"), options.get("ink_weight", 0.1))
        if options.get("model") or options.get("prompts") or options.get("few_step") or options.get("judge"):
            raise UsageError("--model, --prompts, --few-step and --judge are for --task pipeline", "model")
        if options.get("target") is not None:
            check_int("target", options["target"], minimum=0, maximum=9)
        for label in options.get("labels") or ():
            check_int("labels", label, minimum=0, maximum=10)  # 10: the null class
        check_number("ink_weight", options.get("ink_weight", 0.1), minimum=0)
        return
    from ..backbones.rewards import check_reward

    for key in ("model", "prompts"):
        if not options.get(key):
            raise UsageError(f"--task pipeline needs --{key}", key)
    for key in ("model", "clip", "pickscore", "few_step"):
        if options.get(key) and not Path(str(options[key])).is_dir():
            raise UsageError(f"--{key.replace('_', '-')} {options[key]}: no such folder", key)
    if options.get("head") and not Path(str(options["head"])).is_file():
        raise UsageError(f"--head {options['head']}: no such file", "head")
    folders = {"clip": options.get("clip"), "pickscore": options.get("pickscore"), "head": options.get("head")}
    check_reward(options.get("reward", "clip"), **folders)
    if options.get("judge"):
        check_reward(options["judge"], **folders)
    _prompts(options["prompts"])


def _prompts(text) -> list[str]:
    """--prompts: a list, a text file with one prompt per line, or prompts separated by |; none is an error."""
    if isinstance(text, (list, tuple)):
        prompts = [check_text("prompts", p).strip() for p in text]
    else:
        path = Path(str(text))
        lines = path.read_text().splitlines() if path.is_file() else str(text).split("|")
        prompts = [p.strip() for p in lines if p.strip()]
    if not prompts:
        raise UsageError(f"--prompts {text!r} holds no prompt", "prompts")
    return prompts


def _task(options: dict, cfg):
    import torch

    from ..recipes.finetune_tasks import digits_task, pipeline_task

    kind = _task_kind(options)
    device = "cpu" if cfg.cpu or not torch.cuda.is_available() else "cuda"
    if kind == "digits":  # the options were checked by _check_task_options
        return digits_task(options.get("reward", "class"), options.get("target", 3), options.get("labels"),
                           options.get("ink_weight", 0.1), device=device)
    from .. import backbones

    pipe = backbones.load_pipeline(options["model"], device)
    folders = {"clip": options.get("clip"), "pickscore": options.get("pickscore"), "head": options.get("head")}
    models: dict = {}  # a folder the reward and the judge both name is read once
    reward = backbones.load_reward(options.get("reward", "clip"), device=device, models=models, **folders)
    judge = (backbones.load_reward(options["judge"], device=device, models=models, **folders) if options.get("judge")
             else None)
    gs = cfg.guidance_scale if cfg.guidance_scale is not None else 1.0
    few_step = backbones.load_denoiser(pipe, options["few_step"]) if options.get("few_step") else None
    return pipeline_task(pipe, _prompts(options["prompts"]), reward, guidance_scale=gs, few_step=few_step,
                         judge=judge)


def _saved_options(output: Path, given: dict, defaults: dict) -> dict:
    """The options a resumed run was started with (its ``command.json``), with those ``given`` now; an option
    that would change the run (anything but how long it runs and what it reports) is refused. An option the
    run was started without had its default (``defaults``; a task option's is unknown here, so it is refused)."""
    saved = output / "command.json"
    if not saved.is_file():
        return dict(given)
    values = load_config(saved)
    for name, value in sorted(given.items()):
        before = values.get(name, defaults.get(name, _UNSET))
        if name not in _RESUMABLE and (before is _UNSET or _differs(before, value)):
            raise UsageError(f"--resume keeps the run's options, but --{name.replace('_', '-')} {value!r} differs "
                             f"from the run's {'(unset)' if before is _UNSET else repr(before)} in {saved}; drop it, "
                             "or start a new run in another --output", name)
    return {**values, **given}


_UNSET = object()


def _differs(saved, given) -> bool:
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # JSON writes tuples as lists
    return norm(saved) != norm(given)


def run_finetune(args) -> None:
    from dataclasses import fields

    from ..finetuning import FinetuneConfig, finetune, run_files
    from ..finetuning.checkpoints import write_json

    from_file = load_config(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    given = {**from_file, **flags}
    if args.command == "shortft" and given.setdefault("strategy", "shortft") != "shortft":
        raise UsageError(f"sdo shortft runs strategy shortft, not {given['strategy']!r}; use sdo finetune for that")
    if "output" not in given:
        raise UsageError("give the run folder: --output or `output` in the config")
    if not isinstance(given["output"], (str, Path)):
        raise UsageError(f"{args.config}: output must be a folder path, got {given['output']!r}", "output")
    saved = Path(given["output"]) / "command.json"
    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    values = _saved_options(Path(given["output"]), given, defaults) if given.get("resume") else given
    options = {k: values[k] for k in _TASK_KEYS if k in values}
    try:  # every option checked before anything is written
        cfg = FinetuneConfig.from_dict({k: v for k, v in values.items() if k not in _TASK_KEYS})
        _check_task_options(options)
    except UsageError as err:
        if err.option in from_file and err.option not in flags:  # a config file's value: name the file
            raise UsageError(f"{args.config}: {err}", err.option) from None
        raise
    main_process = os.environ.get("RANK", "0") == "0"  # under `accelerate launch` only rank 0 writes command.json
    found = run_files(cfg.output) + (["command.json"] if main_process and saved.is_file() else [])
    if cfg.resume and not any((cfg.output / "checkpoints").glob("step-*")):
        raise UsageError(f"--resume: {cfg.output} holds no checkpoint to resume from (a run stopped before its first "
                         "checkpoint starts again in a new --output)", "resume")
    if not cfg.resume and found:  # refused before command.json is touched, so the earlier run stays resumable
        raise FileExistsError(f"{cfg.output} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                              "or choose a new --output")
    if main_process:
        saved.parent.mkdir(parents=True, exist_ok=True)
        write_json(saved, {k: v for k, v in values.items() if k != "resume"})
    result = finetune(_task(options, cfg), cfg)
    print(json.dumps({"updates": result.updates, "skipped": result.skipped, "seconds": round(result.seconds, 2),
                      "seconds_per_update": round(result.seconds_per_update, 4), "evaluation": result.evaluation},
                     indent=2))
    print(f"wrote {cfg.output}/lora, metrics.jsonl, reward.png, final.png and summary.json", file=sys.stderr)
    if result.keep is not None and result.keep != cfg.output / "lora":
        why = "stopped there" if result.stopped_on_hacking else "the final LoRA failed it"
        print(f"KEEP {result.keep}: update {result.kept_update}'s LoRA, the last that passed the reward-hacking guard "
              f"({why}; see summary.json's guard)", file=sys.stderr)
    elif result.keep is not None:
        print(f"keep {result.keep}: the final LoRA passed the reward-hacking guard", file=sys.stderr)


def _check_lora_output(output: Path, sources: list[Path], force: bool) -> None:
    """Before any work: the output is never one of the sources (or inside one), and an existing, non-empty output
    folder is replaced only with ``--force``."""
    out = output.resolve()
    for source in sources:
        if out == source.resolve() or source.resolve() in out.parents:
            raise UsageError(f"the output {output} is the source {source} (or inside it); write to another folder")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise FileExistsError(f"{output} already exists; pass --force to replace it, or choose another --output")


def run_lora(args) -> None:
    from ..finetuning.lora_arithmetic import merge_lora_files, scale_lora_files

    sources = [args.source] if args.action == "scale" else args.sources
    if args.action == "merge" and len(args.weights) != len(args.sources):
        raise UsageError(f"{len(args.sources)} LoRAs but {len(args.weights)} weights: give one weight per LoRA")
    _check_lora_output(args.output, sources, args.force)
    if args.action == "scale":
        scale_lora_files(args.source, args.output, args.alpha)
    else:
        merge_lora_files(args.sources, args.weights, args.output)
    print(f"wrote {args.output}")
