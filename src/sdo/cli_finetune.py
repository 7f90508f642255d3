"""``sdo finetune``, ``sdo shortft`` and ``sdo lora scale|merge``: the command-line side of :mod:`sdo.finetuning`,
:mod:`sdo.shortft` and :mod:`sdo.lora`. ``sdo shortft`` is ``sdo finetune --strategy shortft``.

``sdo finetune --config run.toml --strategy sdo`` reads a JSON or TOML file whose keys are
:class:`~sdo.FinetuneConfig` fields and the task's options (``task``, ``reward``, ``target``, ``labels``,
``model``, ``prompts``, ``clip``, ``head``); flags override the file. The options are saved in the run folder
(``command.json``), so ``sdo finetune --output RUN --resume`` continues a run with the options it was started
with (flags given with ``--resume`` override them, e.g. a larger ``--updates``). Parsing imports no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["add_parsers", "load_config", "run_finetune", "run_lora"]

# FinetuneConfig's fields by how the command line parses them (a test keeps this list equal to the dataclass)
_INT = ("k", "segments", "steps", "updates", "batch_size", "accumulation", "rank", "warmup", "seed", "checkpoint_every",
        "keep_checkpoints", "sample_every", "sample_count", "eval_count", "max_nonfinite", "guard_every", "guard_count",
        "guard_patience")
_FLOAT = ("eta", "lr", "weight_decay", "regularizer")
_OPTIONAL_FLOAT = ("guidance_scale", "max_grad_norm", "alpha", "time_budget")
_TUPLE = {"betas": float, "target_modules": str, "eval_scales": float}
_CHOICES = {"strategy": ("sdo", "random-truncated", "truncated", "checkpoint", "full", "shortft"),
            "base_dtype": ("float32", "bfloat16", "float16")}
_FLAGS = ("resume", "tensorboard", "cpu", "stop_on_hacking")
_TASK_KEYS = ("task", "reward", "target", "labels", "ink_weight", "model", "prompts", "clip", "head", "few_step")


def _optional_float(text: str):
    return None if text.lower() == "none" else float(text)


def _tuple(kind):
    return lambda text: tuple(kind(v.strip()) for v in text.split(",") if v.strip())


def add_parsers(sub) -> None:
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
    ft.add_argument("--config", type=Path, help="JSON or TOML file of options (flags override it)")
    ft.add_argument("--output", type=Path, help="run folder (required here or in the config)")
    for name in _INT:
        ft.add_argument("--" + name.replace("_", "-"), dest=name, type=int)
    for name in _FLOAT:
        ft.add_argument("--" + name.replace("_", "-"), dest=name, type=float)
    for name in _OPTIONAL_FLOAT:
        ft.add_argument("--" + name.replace("_", "-"), dest=name, type=_optional_float, help="a number or none")
    for name, kind in _TUPLE.items():
        ft.add_argument("--" + name.replace("_", "-"), dest=name, type=_tuple(kind), help="comma-separated")
    for name, choices in _CHOICES.items():
        ft.add_argument("--" + name.replace("_", "-"), dest=name, choices=choices)
    ft.add_argument("--lr-scheduler", dest="lr_scheduler", help="diffusers scheduler name (constant, cosine, ...)")
    for name in _FLAGS:
        ft.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true")
    ft.add_argument("--no-progress", dest="progress", action="store_false")
    ft.add_argument("--no-progressive", dest="progressive", action="store_false",
                    help="shortft: train every LoRA on the stage-1 chain throughout")
    task = ft.add_argument_group("task")
    task.add_argument("--task", choices=("digits", "pipeline"), help="default: digits without --model")
    task.add_argument("--reward", help="digits: class | ink | class+ink (default class); pipeline: clip | aesthetic")
    task.add_argument("--target", type=int, help="digits: the class rewarded (default 3)")
    task.add_argument("--labels", type=_tuple(int), help="digits: classes to condition on (default: unconditional)")
    task.add_argument("--ink-weight", dest="ink_weight", type=float, help="digits: weight of the ink term")
    task.add_argument("--model", help="a local diffusers pipeline folder")
    task.add_argument("--prompts", help="pipeline: a text file, one prompt per line, or prompts separated by |")
    task.add_argument("--clip", help="pipeline: a local CLIP model folder (the reward's)")
    task.add_argument("--head", help="pipeline: aesthetic head (safetensors) for --reward aesthetic")
    task.add_argument("--few-step", dest="few_step", help="shortft, pipeline: a diffusers folder of the few-step "
                      "model (the pipeline's denoiser with e.g. a Hyper-SD LoRA fused in and saved)")


def _lora_parsers(sub) -> None:
    lora = sub.add_parser("lora", help="scale or merge LoRA folders", description="LoRA arithmetic on saved folders.")
    lora_sub = lora.add_subparsers(dest="action", required=True)
    scale = lora_sub.add_parser("scale", help="theta + alpha * delta: a LoRA whose update is scaled by alpha")
    scale.add_argument("source", type=Path)
    scale.add_argument("output", type=Path)
    scale.add_argument("--alpha", type=float, required=True)
    scale.add_argument("--force", action="store_true", help="replace an existing output folder (never a source)")
    merge = lora_sub.add_parser("merge", help="theta + sum_i w_i delta_i: several LoRAs as one (exact)")
    merge.add_argument("sources", type=Path, nargs="+")
    merge.add_argument("--weights", type=_tuple(float), required=True, help="one per source, comma-separated")
    merge.add_argument("--output", type=Path, required=True)
    merge.add_argument("--force", action="store_true", help="replace an existing output folder (never a source)")


def load_config(path: Path) -> dict:
    """A config file as a dict: ``.toml`` (tomllib) or ``.json``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(path.read_text())
    if path.suffix == ".json":
        return json.loads(path.read_text())
    raise ValueError(f"{path}: the config must be .toml or .json")


def _prompts(text) -> list[str]:
    if isinstance(text, (list, tuple)):
        return [str(p) for p in text]
    path = Path(text)
    lines = path.read_text().splitlines() if path.is_file() else str(text).split("|")
    return [p.strip() for p in lines if p.strip()]


def _task(options: dict, cfg):
    import torch

    from .reward_tasks import digits_task, pipeline_task

    kind = options.get("task") or ("pipeline" if options.get("model") else "digits")
    device = "cpu" if cfg.cpu or not torch.cuda.is_available() else "cuda"
    if kind == "digits":
        if options.get("model") or options.get("prompts") or options.get("few_step"):
            raise ValueError("--model, --prompts and --few-step are for --task pipeline")
        return digits_task(options.get("reward", "class"), options.get("target", 3), options.get("labels"),
                           options.get("ink_weight", 0.1), device=device)
    from transformers import CLIPModel, CLIPTokenizer

    from . import tasks
    from .clip import AestheticScore, CLIPTextSimilarity

    for key in ("model", "prompts", "clip"):
        if not options.get(key):
            raise ValueError(f"--task pipeline needs --{key}")
    pipe = tasks.load_pipeline(options["model"], device)
    clip = CLIPModel.from_pretrained(options["clip"], local_files_only=True).to(device).eval().requires_grad_(False)
    name = options.get("reward", "clip")
    if name == "aesthetic":
        if not options.get("head"):
            raise ValueError("--reward aesthetic needs --head (a LAION-style aesthetic head in safetensors)")
        reward = ("objective", AestheticScore(clip, AestheticScore.load_head(options["head"])))
    elif name == "clip":
        tokenizer = CLIPTokenizer.from_pretrained(options["clip"], local_files_only=True)
        prompts = _prompts(options["prompts"])
        embeds = CLIPTextSimilarity(clip, prompts, tokenizer).text_embeds  # the prompt set, encoded once
        row = {p: i for i, p in enumerate(prompts)}

        def reward(images, batch):  # CLIP similarity of each image to its own prompt
            return 1 - CLIPTextSimilarity(clip, text_embeds=embeds[[row[p] for p in batch]])(images)
    else:
        raise ValueError(f"unknown pipeline reward {name!r}; use clip or aesthetic")
    gs = cfg.guidance_scale if cfg.guidance_scale is not None else 1.0
    few_step = None
    if options.get("few_step"):
        few_step = type(pipe.denoiser).from_pretrained(options["few_step"], local_files_only=True)
        few_step.to(device).eval().requires_grad_(False)
    return pipeline_task(pipe, _prompts(options["prompts"]), reward, guidance_scale=gs, few_step=few_step)


def run_finetune(args) -> None:
    from .checkpoints import write_json
    from .finetuning import FinetuneConfig, finetune, run_files

    given = load_config(args.config) if getattr(args, "config", None) else {}
    given.update({k: v for k, v in vars(args).items() if k not in ("command", "config")})
    if args.command == "shortft" and given.setdefault("strategy", "shortft") != "shortft":
        raise ValueError(f"sdo shortft runs strategy shortft, not {given['strategy']!r}; use sdo finetune for that")
    if "output" not in given:
        raise ValueError("give the run folder: --output or `output` in the config")
    saved = Path(given["output"]) / "command.json"  # a resumed run starts from the options it was started with
    values = json.loads(saved.read_text()) if given.get("resume") and saved.is_file() else {}
    values.update(given)
    options = {k: values[k] for k in _TASK_KEYS if k in values}
    cfg = FinetuneConfig.from_dict({k: v for k, v in values.items() if k not in _TASK_KEYS})  # checked before writing
    main_process = os.environ.get("RANK", "0") == "0"  # under `accelerate launch` only rank 0 writes command.json
    found = run_files(cfg.output) + (["command.json"] if main_process and saved.is_file() else [])
    if not cfg.resume and found:  # refused before command.json is touched, so the earlier run stays resumable
        raise FileExistsError(f"{cfg.output} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                              "or choose a new --output")
    if main_process:
        saved.parent.mkdir(parents=True, exist_ok=True)
        write_json(saved, {k: v for k, v in values.items() if k != "resume"})
    result = finetune(_task(options, cfg), cfg)
    print(json.dumps({"updates": result.updates, "skipped": result.skipped, "seconds": round(result.seconds, 2),
                      "seconds_per_update": round(result.seconds_per_update, 4), "evaluation": result.evaluation}, indent=2))
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
            raise ValueError(f"the output {output} is the source {source} (or inside it); write to another folder")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise FileExistsError(f"{output} already exists; pass --force to replace it, or choose another --output")


def run_lora(args) -> None:
    from .lora import merge_lora_files, scale_lora_files

    sources = [args.source] if args.action == "scale" else args.sources
    if args.action == "merge" and len(args.weights) != len(args.sources):
        raise ValueError(f"{len(args.sources)} LoRAs but {len(args.weights)} weights: give one weight per LoRA")
    _check_lora_output(args.output, sources, args.force)
    if args.action == "scale":
        scale_lora_files(args.source, args.output, args.alpha)
    else:
        merge_lora_files(args.sources, args.weights, args.output)
    print(f"wrote {args.output}")
