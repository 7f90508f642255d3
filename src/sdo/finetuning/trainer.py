"""``finetune``: reward fine-tuning of a diffusion model's denoiser with LoRA, the gradient taken through the
sampler by a strategy (Sec. 5.2 of Dou et al., 2025).

Per update: draw conditions and initial noise, sample with the method's rollout (:mod:`sdo.finetuning.method`),
score the decoded samples with a differentiable reward, and step AdamW on ``-mean reward`` (plus, optionally,
DRaFT+'s penalty that keeps the tuned denoiser near its base). Methods by name:

- ``sdo``: one denoiser call keeps its graph, at a step drawn uniformly per update (Eq. 20): SDO;
- ``random-truncated``: the last k ~ U{1..N} calls, recomputed in backward: AlignProp-uniform;
- ``truncated``: the last ``k`` calls: DRaFT-K (k = 1: AlignProp-1);
- ``checkpoint`` (or ``full``): every call (recomputed in backward): full BPTT;
- ``shortft``: per-segment LoRAs through a chain shortened by a few-step model (:mod:`sdo.finetuning.shortft`).

Runs the same under ``accelerate launch`` on several processes: every process draws the same global batch
from the same seeds and keeps its slice, gradients are averaged with one all-reduce per update (accelerate's
``reduce``; no DDP hooks, so every strategy's backward works), so weights stay identical across ranks and equal
a one-process run with the same global batch. Nothing is lost on a kill: see :mod:`sdo.finetuning.checkpoints`. Every
``guard_every`` updates the samples of fixed seeds are checked for reward hacking (:mod:`sdo.finetuning.guard`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import report
from ..chain import Chain
from ..checks import NonFiniteError, UsageError
from ..denoiser import Denoiser, checkpoint_blocks
from ..gradients import strategy_for
from ..sampling import sample
from .anchor import Anchored
from .checkpoints import (
    latest_checkpoint,
    load_latest,
    load_optimizer_state,
    optimizer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import BASE_DTYPES, FinetuneConfig, FinetuneResult, FinetuneTask
from .guard import Guard, GuardCheck
from .lora import add_lora
from .method import Method
from .pretrain import diffusion_loss
from .results import finish, keep_folder, plot_rewards, read_metrics, run_files, warn_hacking, write_metrics
from .shortft import ShortFT

__all__ = ["GUARD_SEEDS", "TrainingRun", "run_training"]

GUARD_SEEDS = 30_000  # the base of the hacking guard's fixed seeds (TrainingRun.fixed_samples)


def _strategy(cfg: FinetuneConfig, generator: torch.Generator):
    """The gradient method as the name table sets it up for weights (ShortFT is a method of its own: _method)."""
    return strategy_for(cfg.strategy, weights=True, steps=cfg.steps, generator=generator, k=cfg.k)


def _method(task: FinetuneTask, cfg: FinetuneConfig, model: torch.nn.Module, device: torch.device,
            generator: torch.Generator) -> Method:
    """The fine-tuning method ``cfg.strategy`` names: ShortFT, or one LoRA trained through the gradient strategy
    of :func:`_strategy` (``generator``: its random draws)."""
    if cfg.strategy == "shortft":
        return ShortFT(task, cfg, model, device)
    config = add_lora(model, rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.target_modules, init_seed=cfg.seed)
    return Method(model, {"lora": "default"}, {"default": config}, _strategy(cfg, generator))


def _accelerator(cfg: FinetuneConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ImportError("tensorboard=True needs the tensorboard package (pip install tensorboard)")
    project = ProjectConfiguration(project_dir=str(cfg.output), logging_dir=str(cfg.output / "tensorboard"))
    return Accelerator(cpu=cfg.cpu, log_with="tensorboard" if cfg.tensorboard else None, project_config=project)


class TrainingRun:
    """The state of one fine-tuning run: the model with the LoRAs of its :class:`~sdo.finetuning.method.Method`
    (``method``), the optimizer, the random streams and the counters; :meth:`update` is one optimizer update."""

    def __init__(self, task: FinetuneTask, cfg: FinetuneConfig):
        from diffusers.optimization import get_scheduler

        self.task, self.cfg = task, cfg
        self.acc = acc = _accelerator(cfg)
        if cfg.batch_size % acc.num_processes:
            raise UsageError(f"batch_size={cfg.batch_size} must be divisible by the {acc.num_processes} processes")
        if not len(task.conditions):
            raise UsageError("the task has no conditions to draw from")
        if cfg.pretrain_weight and task.data is None:
            raise UsageError("pretrain_weight needs real data: this task has none (FinetuneTask.data); the digits task "
                             "has the digits' training images", "pretrain_weight")
        self.local = cfg.batch_size // acc.num_processes
        model = task.model
        if cfg.base_dtype != "float32":
            model.to(dtype=BASE_DTYPES[cfg.base_dtype])
        model.to(acc.device)
        # the same seeds on every process: each draws the global batch and keeps its slice
        self.generators = {name: torch.Generator().manual_seed(cfg.seed * 1000 + i)
                           for i, name in enumerate(("data", "strategy", "noise"))}
        self.generators["noise"].manual_seed(cfg.seed * 1000 + 2 + 100 * acc.process_index)
        if cfg.pretrain_weight:  # its own stream, so the other draws are those of a run without it
            self.generators["pretrain"] = torch.Generator().manual_seed(cfg.seed * 1000 + 3 + 100 * acc.process_index)
        if cfg.block_checkpointing:  # the same gradient; the activations inside each block recomputed in backward
            checkpoint_blocks(model)
        self.method = _method(task, cfg, model, acc.device, self.generators["strategy"])
        self.wrapped = Anchored(self.method.sampled, cfg.regularizer)
        self.optimizer = torch.optim.AdamW(self.method.params, lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.warmup,
                                          num_training_steps=cfg.updates)
        self.solver = self.wrapped.solver = task.solver(cfg.steps, eta=cfg.eta)
        self.dtype = BASE_DTYPES[cfg.base_dtype]
        self.step, self.skipped, self.in_a_row, self.seconds = 0, 0, 0, 0.0
        # the hacking guard; (update, LoRA tensors) of the last passing check; whether the latest check failed
        self.guard, self.kept, self.guard_failing = None, None, False

    # -- the hacking guard (sdo.finetuning.guard) --------------------------------------------------------------
    def start_guard(self) -> None:
        """The base model's fixed-seed samples; the LoRA of the current step is the one kept until a check."""
        images, conditions = self.fixed_samples(self.cfg.guard_count, 0.0, GUARD_SEEDS)
        self.guard = Guard(images, conditions, self.task.describe)
        if self.kept is None:
            self.kept = (self.step, self.method.copy())

    def guard_check(self) -> GuardCheck:
        """Check the current LoRA; a passing one becomes the LoRA to keep."""
        check = self.guard.check(self.step, self.fixed_samples(self.cfg.guard_count, 1.0, GUARD_SEEDS)[0])
        self.guard_failing = not check.passed
        if check.passed:
            self.kept = (self.step, self.method.copy())
        return check

    # -- sampling ---------------------------------------------------------------------------------------------
    def chain(self, conditions: list) -> Chain:
        cond, uncond = self.task.encode(conditions)
        guided = uncond is not None and self.cfg.guidance_scale is not None
        return Chain(Denoiser(self.wrapped, cond, uncond if guided else None,
                              self.cfg.guidance_scale if guided else None), self.solver)

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents if self.task.decode is None else self.task.decode(latents)).float()

    def draw(self, n: int, generator: torch.Generator) -> tuple[list, torch.Tensor]:
        index = torch.randint(len(self.task.conditions), (n,), generator=generator)
        x = torch.randn(n, *self.task.latent_shape, generator=generator) * self.solver.init_noise_sigma
        return [self.task.conditions[int(i)] for i in index], x.to(self.acc.device, self.dtype)

    # -- one update -------------------------------------------------------------------------------------------
    def gradient(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One update's micro-batches, backward included: (the trainable LoRA weights' gradient, flattened and
        averaged over processes; every process's rewards; the mean loss, penalty and pre-training loss)."""
        cfg, acc = self.cfg, self.acc
        rank = slice(acc.process_index * self.local, (acc.process_index + 1) * self.local)
        rewards, losses, penalties, pretrains = [], [], [], []
        for _ in range(cfg.accumulation):
            conditions, x = self.draw(cfg.batch_size, self.generators["data"])
            conditions, x = conditions[rank], x[rank]
            with self.wrapped.record() as record:
                x0 = self.method.rollout(self.chain(conditions), x, self.generators["noise"])
            copies, rest = divmod(x0.shape[0], len(conditions))  # DRaFT-LV: several samples per condition
            if rest or not copies:
                raise UsageError(f"the method returned {x0.shape[0]} samples for {len(conditions)} conditions")
            scored = conditions * copies  # copy by copy, as the samples are stacked
            reward = self.task.reward(self.images(x0), scored)
            if tuple(reward.shape) != (len(scored),):
                raise UsageError(f"the reward returned shape {tuple(reward.shape)}; expected ({len(scored)},)")
            penalty = self.wrapped.penalty(record)
            penalty = reward.new_zeros(()) if penalty is None else penalty
            loss = -reward.float().mean() + cfg.regularizer * penalty
            if cfg.pretrain_weight:  # ReFL's pre-training loss on a batch of real data
                data, data_conditions = self.task.data(len(conditions), self.generators["pretrain"])
                cond = self.task.encode(data_conditions)[0]
                pretrain = diffusion_loss(self.method.sampled, self.task.scheduler,
                                          data.to(self.acc.device, self.dtype), cond, self.generators["pretrain"])
                loss = loss + cfg.pretrain_weight * pretrain
                pretrains.append(pretrain.detach().float())
            (loss / cfg.accumulation).backward()
            rewards.append(reward.detach().float())
            losses.append(loss.detach().float())
            penalties.append(penalty.detach().float())
        trainable = [p for p in self.method.params if p.requires_grad]
        grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in trainable])
        pretrain = torch.stack(pretrains).mean() if pretrains else torch.zeros(())
        scalars = torch.stack([torch.stack(losses).mean(), torch.stack(penalties).mean(), pretrain])
        if acc.num_processes > 1:
            grads, scalars = acc.reduce(grads, "mean"), acc.reduce(scalars.to(acc.device), "mean")
        if not bool(grads.any()):  # not a zero step that AdamW would still move on momentum and weight decay
            name = getattr(self.task.reward, "__name__", type(self.task.reward).__name__)
            raise UsageError(f"no gradient reached the trainable LoRA weights (exactly zero): the reward {name} does "
                             "not change with them; check that it is differentiable in the images and not saturated")
        return grads, acc.gather(torch.cat(rewards).to(acc.device)).cpu(), scalars

    def update(self) -> dict:
        cfg, acc = self.cfg, self.acc
        start = time.perf_counter()
        record = self.method.before_update(self)
        grads, rewards, scalars = self.gradient()
        trainable = [p for p in self.method.params if p.requires_grad]
        finite = bool(torch.isfinite(grads).all() and torch.isfinite(scalars).all())
        norm = float(grads.norm())
        if finite:
            offset = 0
            for p in trainable:
                p.grad = grads[offset: offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            self.optimizer.step()
            if not bool(torch.stack([torch.isfinite(p).all() for p in trainable]).all()):  # a huge lr; one sync
                saved = latest_checkpoint(cfg.output / "checkpoints")
                raise NonFiniteError(
                    f"update {self.step + 1} made the LoRA weights non-finite (gradient norm {norm:.3g}, lr "
                    f"{self.lr_scheduler.get_last_lr()[0]:g}); stopped before saving it, so the last checkpoint "
                    f"({saved or 'none yet'}) is intact. Lower lr")
            self.lr_scheduler.step()
            self.in_a_row = 0
        else:
            self.skipped += 1
            self.in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - start
        if acc.num_processes > 1:  # the slowest process's time, so that a time budget stops every process together
            seconds = float(acc.reduce(torch.tensor([seconds], device=acc.device), "max"))
        self.seconds += seconds
        finite_rewards = rewards[torch.isfinite(rewards)]
        return {**record, "update": self.step,
                "reward_mean": float(finite_rewards.mean()) if len(finite_rewards) else math.nan,
                "reward_std": float(finite_rewards.std()) if len(finite_rewards) > 1 else 0.0,
                "loss": float(scalars[0]), "penalty": float(scalars[1]), "grad_norm": norm,
                **({"pretrain_loss": float(scalars[2])} if cfg.pretrain_weight else {}),
                "lr": self.lr_scheduler.get_last_lr()[0], "seconds": seconds, "elapsed": self.seconds,
                "skipped": not finite, "skipped_total": self.skipped}

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        path = None
        if self.acc.is_main_process:
            opt_tensors, opt_meta = optimizer_state(self.optimizer)
            rng_tensors, rng_meta = rng_state(self.generators)
            meta = {"optimizer": opt_meta, "rng": rng_meta, "lr_scheduler": self.lr_scheduler.state_dict(),
                    "skipped": self.skipped, "in_a_row": self.in_a_row, "seconds": self.seconds,
                    "processes": self.acc.num_processes, "kept_update": self.kept[0] if self.kept else None,
                    "guard_failing": self.guard_failing, "extra": self.method.state()}
            tensors = {**self.method.tensors(), "optimizer": opt_tensors, "rng": rng_tensors,
                       **{f"kept_{g}": t for g, t in (self.kept or (0, {}))[1].items()}}
            path = save_checkpoint(self.cfg.output / "checkpoints", self.step, tensors, meta, self.cfg.keep_checkpoints)
        self.acc.wait_for_everyone()
        return path

    def restore(self) -> bool:
        """Load the latest checkpoint that loads cleanly (see :func:`sdo.finetuning.checkpoints.load_latest`);
        False if none."""
        found = load_latest(self.cfg.output / "checkpoints")
        if found is None:
            return False
        path, tensors, meta = found
        self.method.load(tensors, path)
        load_optimizer_state(self.optimizer, tensors["optimizer"], meta["optimizer"])
        self.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        noise = self.generators["noise"].get_state() if meta["processes"] != self.acc.num_processes else None
        set_rng_state(self.generators, tensors["rng"], meta["rng"])
        if noise is not None:  # another process count: keep this process's own noise stream
            self.generators["noise"].set_state(noise)
        self.step, self.skipped, self.in_a_row, self.seconds = (meta["step"], meta["skipped"], meta["in_a_row"],
                                                                meta["seconds"])
        if meta.get("kept_update") is not None:
            self.kept = (meta["kept_update"], {g.removeprefix("kept_"): t for g, t in tensors.items()
                                               if g.startswith("kept_")})
        extra = meta.get("extra", {})
        self.guard_failing = meta.get("guard_failing", extra.get("held", False))  # "held": ShortFT's, until 2026-12
        self.method.load_state(extra)
        return True

    # -- pictures ---------------------------------------------------------------------------------------------
    def fixed_samples(self, n: int, scale: float = 1.0, seeds: int = 10_000) -> tuple[torch.Tensor, list]:
        """Samples from fixed seeds (the same at every update and in every run with this seed), no graph; the
        hacking guard draws from other seeds (``GUARD_SEEDS``) than the pictures and the evaluation, so that the
        evaluation's judge reads samples the guard's choices (the kept LoRA, ShortFT's stage ends) never saw."""
        conditions, x = self.draw(n, torch.Generator().manual_seed(seeds + self.cfg.seed))
        with torch.no_grad(), self.method.scaled(scale):
            noise = torch.Generator().manual_seed(seeds + 10_000 + self.cfg.seed)
            x0 = sample(self.chain(conditions), x, generator=noise)
            return self.images(x0), conditions

    def grid(self, path: Path, rows: list[tuple[str, torch.Tensor, list]]) -> None:
        """One row of at most ``sample_count`` samples per ``(label, images, conditions)``, captioned by the task."""
        n = self.cfg.sample_count
        shown = [(label, images[:n].cpu()) for label, images, _ in rows]
        captions = None
        if self.task.caption:
            captions = [self.task.caption(images[:n], conditions[:n]) for _, images, conditions in rows]
        report.save_grid(shown, path, captions=captions, value_range=(-1.0, 1.0))


def run_training(run: TrainingRun) -> FinetuneResult:
    """The loop of :func:`finetune` and :func:`sdo.shortft`: updates, logs, checkpoints, sample grids, the end."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    acc, out = run.acc, cfg.output
    checkpoints = out / "checkpoints"
    found = run_files(out)  # before the barrier, so that no process sees files the main process writes after it
    if run.acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    if cfg.resume:
        if not run.restore():
            raise FileNotFoundError(f"resume=True but {checkpoints} holds no checkpoint")
    elif found:
        raise FileExistsError(f"{out} already holds a run ({', '.join(found)}); pass resume=True (--resume) to "
                              "continue it, or a new output")
    metrics_path = out / "metrics.jsonl"
    metrics = read_metrics(metrics_path, run.step)  # drops what a killed run logged after its last checkpoint
    if acc.is_main_process:
        write_metrics(metrics_path, metrics)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
    if cfg.tensorboard:
        acc.init_trackers("sdo-finetune", config={k: str(v) for k, v in asdict(cfg).items()})
    bar = tqdm(total=cfg.updates, initial=run.step, desc=f"finetune {cfg.strategy}",
               disable=not (cfg.progress and acc.is_main_process))
    if cfg.guard_every:
        run.start_guard()
    stopped, failed_in_a_row = None, 0  # the failed check that stopped the run (stop_on_hacking)
    for record in reversed([r for r in metrics if "guard" in r]):  # a resumed run goes on counting
        if not record["guard"]["failed"]:
            break
        failed_in_a_row += 1
    with open(metrics_path if acc.is_main_process else os.devnull, "a") as log:
        while run.step < cfg.updates and not (cfg.time_budget is not None and run.seconds >= cfg.time_budget):
            record = run.update()
            last = run.step >= cfg.updates or (cfg.time_budget is not None and run.seconds >= cfg.time_budget)
            if cfg.guard_every and (run.step % cfg.guard_every == 0 or last):
                check = run.guard_check()  # every process checks the same fixed seeds on the same weights
                record["guard"] = check.record()
                failed_in_a_row = 0 if check.passed else failed_in_a_row + 1
                if not check.passed:
                    stop = cfg.stop_on_hacking and failed_in_a_row >= cfg.guard_patience
                    warn_hacking(run, check, bar, stop)
                    stopped = check if stop else None
            metrics.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            if cfg.tensorboard:
                acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=run.step)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", skipped=run.skipped)
            if run.in_a_row >= cfg.max_nonfinite:
                raise NonFiniteError(
                    f"{run.in_a_row} updates in a row had a non-finite loss or gradient (update {run.step}); stopped "
                    f"with the last good checkpoint kept in {checkpoints}. Lower lr, set max_grad_norm, or check the "
                    "reward for NaN/inf")
            if run.step % cfg.checkpoint_every == 0:
                run.save()
                if acc.is_main_process:
                    plot_rewards(out, metrics, cfg.strategy)
            if cfg.sample_every and run.step % cfg.sample_every == 0 and acc.is_main_process:
                (out / "samples").mkdir(exist_ok=True)
                run.grid(out / "samples" / f"step-{run.step:07d}.png",
                         [(f"update {run.step}", *run.fixed_samples(cfg.sample_count))])
            if stopped is not None:
                break
    bar.close()
    if run.step % cfg.checkpoint_every:
        run.save()
    evaluation = finish(run, metrics)
    if cfg.tensorboard:
        acc.end_training()
    per_update = [r["seconds"] for r in metrics]
    return FinetuneResult(out, run.step, run.skipped, run.seconds,
                          statistics.median(per_update) if per_update else math.nan, metrics, evaluation,
                          keep=out / keep_folder(run) / "lora" if cfg.guard_every else None,
                          kept_update=run.kept[0] if run.kept else None,
                          stopped_on_hacking=stopped is not None)
