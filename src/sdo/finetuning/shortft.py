
"""ShortFT (Shortcut-based Fine-Tuning; Guo, Cui, Bo, Huang, ICCV 2025): reward fine-tuning end to end through a
chain shortened by a trajectory-preserving few-step model.

The N-step deterministic chain is split into k segments ending at the LoRA steps (:func:`segment_ends`; for SD 1.5's
50 DDIM steps and k = 4, timesteps 761, 501, 261, 1). Each segment j has its own LoRA, stacked: at a timestep of
segment j the LoRAs 1..j are all active (:class:`TimestepLoRA`). The short chain (:func:`short_chain`) runs

- segment 1 on the base chain with LoRA 1;
- every later segment as one jump of the frozen few-step model from the segment's first step to its last
  (:meth:`sdo.solvers.Solver.jump`, a DDIM move, as Hyper-SD, TCD and PCM are sampled), then one base step with
  the segment's LoRAs at that last timestep;

and the reward gradient flows end to end through it (every graph-keeping call checkpointed). Training is
progressive in k stages: stage i trains LoRAs i..k on the chain that runs segments 1..i-1 without a graph (their
LoRAs frozen), segment i on the base chain with its graph, and the shortcuts after it; each stage has an equal
share of the updates (or seconds) left when it began, and with the hacking guard on a stage's LoRA is checked when
its share is used up and is not frozen while the guard's latest check of it failed. Inference runs the original
N-step chain with each timestep's LoRAs (:func:`load_shortft`), at the cost of plain sampling.

Fine-tuning with it (:func:`sdo.shortft`, or :func:`sdo.finetune` with ``strategy="shortft"``) is the trainer's
loop with :class:`ShortFT` as its method: the same options (``segments``, ``progressive``), logs, checkpoints,
resume and ``accelerate launch`` support.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from ..chain import Chain
from ..checks import UsageError
from ..denoiser import Denoiser
from ..solvers import DPMSolverPP
from .checkpoints import write_json
from .config import BASE_DTYPES, FinetuneConfig, FinetuneTask
from .lora import add_lora, load_lora, lora_layers, lora_parameters
from .method import Method

__all__ = ["ShortFT", "TimestepLoRA", "adapter_names", "load_shortft", "segment_ends", "short_chain"]


def segment_ends(steps: int, segments: int) -> tuple[int, ...]:
    """The last step of each of ``segments`` segments of an ``steps``-step chain: floor((j + 1) N / k) - 1.
    For N = 50, k = 4: steps 11, 24, 36, 49, SD 1.5's timesteps 761, 501, 261, 1 (the paper's LoRA timesteps)."""
    if not 1 <= int(segments) <= int(steps):
        raise UsageError(f"need 1 <= segments <= steps, got segments={segments}, steps={steps}")
    return tuple((j + 1) * int(steps) // int(segments) - 1 for j in range(int(segments)))


def adapter_names(segments: int) -> list[str]:
    """The adapter names of the stacked LoRAs: ``segment_1`` .. ``segment_k``."""
    return [f"segment_{j + 1}" for j in range(int(segments))]


class TimestepLoRA(torch.nn.Module):
    """``model`` with stacked timestep-aware LoRAs: at a timestep t of segment j (t >= ``timesteps[j]`` and below
    ``timesteps[j - 1]``; the LoRA timesteps, decreasing), adapters ``adapters[0..j]`` are active and the others are
    not run at all, so a call costs what one with j + 1 plain LoRAs costs. The active set comes from each call's own
    timestep, so a checkpointed call recomputes with the same LoRAs. Other adapters of ``model`` are left as they are.

    peft's public ``set_adapter`` also flips ``requires_grad`` (it would unfreeze the LoRAs of earlier stages), so
    the layers' active lists are switched directly (``_active_adapter``, what ``set_adapter`` itself assigns)."""

    def __init__(self, model: torch.nn.Module, adapters: Sequence[str], timesteps: Sequence[int]):
        super().__init__()
        if len(adapters) != len(timesteps) or not adapters:
            raise UsageError(f"one LoRA timestep per adapter: got {len(adapters)} adapters, {len(timesteps)} timesteps")
        if any(a <= b for a, b in itertools.pairwise(timesteps)):
            raise UsageError(f"LoRA timesteps must decrease (noisiest segment first), got {list(timesteps)}")
        self.model, self.adapters, self.timesteps = model, list(adapters), [int(t) for t in timesteps]
        self.config = getattr(model, "config", None)
        self.scale = 1.0
        self._layers = list({id(m): m for name in self.adapters for _, m in lora_layers(model, name)}.values())

    def segment(self, t) -> int:
        """The 0-based segment of timestep ``t``."""
        return next((j for j, b in enumerate(self.timesteps) if float(t) >= b), len(self.timesteps) - 1)

    def forward(self, sample, timestep=None, *args, **kwargs):
        ts = torch.as_tensor(timestep).reshape(-1)
        if bool((ts != ts[0]).any()):
            raise UsageError("TimestepLoRA takes one timestep per call (the rows had different timesteps)")
        on = self.adapters[: self.segment(ts[0]) + 1]
        saved = [(m, m._active_adapter, dict(m.scaling) if self.scale != 1.0 else None) for m in self._layers]
        for m, active, scaling in saved:
            others = [a for a in ([active] if isinstance(active, str) else active) if a not in self.adapters]
            m._active_adapter = others + [a for a in on if a in m.lora_A]
            if scaling is not None:
                m.scaling.update({a: scaling[a] * self.scale for a in on if a in m.lora_A})
        try:
            return self.model(sample, *args, timestep=timestep, **kwargs)  # SD3: its 2nd positional is the text
        finally:
            for m, active, scaling in saved:
                m._active_adapter = active
                if scaling is not None:
                    m.scaling.update(scaling)

    @contextlib.contextmanager
    def scaled(self, scale: float):
        """Every LoRA at ``scale`` inside the context (0: the base model)."""
        was, self.scale = self.scale, float(scale)
        try:
            yield self
        finally:
            self.scale = was


def _check_ends(chain: Chain, ends: Sequence[int]) -> None:
    if not ends or list(ends) != sorted(set(ends)) or ends[0] < 0 or ends[-1] != len(chain) - 1:
        raise UsageError(f"segment ends must increase and end at the last step {len(chain) - 1}, got {list(ends)}")
    if isinstance(chain.solver, DPMSolverPP) or any(chain.solver.noise_steps()):
        raise UsageError(f"ShortFT jumps along a deterministic first-order chain; {type(chain.solver).__name__} "
                         "is multistep or stochastic: use DDIM (eta = 0), Euler or flow Euler")


def _jump(chain: Chain, few_step: Denoiser, a: int, b: int, x: torch.Tensor) -> torch.Tensor:
    return chain.solver.jump(a, b, x, few_step(chain.solver.model_input(a, x), chain.timesteps[a]))


def short_chain(chain: Chain, few_step, x: torch.Tensor, ends: Sequence[int], *, stage: int = 0,
                use_checkpoint: bool = True) -> torch.Tensor:
    """The sample of ShortFT's chain from ``x`` (module docstring) at progressive ``stage`` (0-based): steps
    before segment ``stage`` run without a graph, segment ``stage`` on ``chain``, each later segment as a
    ``few_step`` jump (a :class:`~sdo.Denoiser` bound like ``chain``'s, or a callable ``model(x, t)``) to its last
    step and one ``chain`` step there. Under grad every call that keeps a graph is checkpointed unless
    ``use_checkpoint=False`` (the same gradient, more memory)."""
    _check_ends(chain, ends)
    if not 0 <= stage < len(ends):
        raise UsageError(f"stage must be in 0..{len(ends) - 1}, got {stage}")
    few_step = few_step if isinstance(few_step, Denoiser) else Denoiser(few_step)
    chain.check(x)
    grad = torch.is_grad_enabled()

    def run(fn, *args):
        return checkpoint(fn, *args, use_reentrant=False) if grad and use_checkpoint else fn(*args)

    state = chain.init_state(x)
    first = 0 if stage == 0 else ends[stage - 1] + 1
    with torch.no_grad():
        for i in range(first):
            x, state = chain.step(i, x, state)
    for i in range(first, ends[stage] + 1):
        x, state = run(chain.step, i, x, state)
    for p in range(stage + 1, len(ends)):
        a, b = ends[p - 1] + 1, ends[p]
        if b > a:
            x = run(_jump, chain, few_step, a, b, x)
        x, state = run(chain.step, b, x, state)
    return x


class ShortFT(Method):
    """ShortFT as a fine-tuning method (:class:`~sdo.finetuning.method.Method`): stacked LoRAs per segment, sampled
    by :func:`short_chain` through ``task.few_step``, trained in progressive stages. ``model`` is on ``device`` in the
    run's dtype; the frozen few-step model is moved there."""

    def __init__(self, task: FinetuneTask, cfg: FinetuneConfig, model: torch.nn.Module, device: torch.device):
        if task.few_step is None:
            raise UsageError("ShortFT needs a few-step model: set FinetuneTask.few_step (the digits task ships one; "
                             "for a pipeline, a UNet with a Hyper-SD/TCD/PCM LoRA fused in)")
        card = getattr(task.few_step, "sdo_card", None)
        if card and (card["config"]["steps"], card["config"]["segments"]) != (cfg.steps, cfg.segments):
            raise UsageError(f"the few-step model was distilled for steps={card['config']['steps']}, segments="
                             f"{card['config']['segments']}; run with those "
                             f"(got steps={cfg.steps}, segments={cfg.segments})")
        names = adapter_names(cfg.segments)
        configs = {name: add_lora(model, rank=cfg.rank, alpha=cfg.alpha, adapter_name=name,
                                  target_modules=cfg.target_modules, init_seed=cfg.seed + j)
                   for j, name in enumerate(names)}
        self.cfg, self.ends = cfg, segment_ends(cfg.steps, cfg.segments)
        solver = task.solver(cfg.steps)
        self.timestep_lora = TimestepLoRA(model, names, [int(solver.timesteps[e]) for e in self.ends])
        super().__init__(model, {f"lora_{name}": name for name in names}, configs, None, sampled=self.timestep_lora)
        self.adapter_params = [lora_parameters(model, name) for name in names]
        self.few_step = task.few_step.requires_grad_(False).eval()
        if cfg.base_dtype != "float32":  # the frozen few-step model in the base's dtype
            self.few_step.to(dtype=BASE_DTYPES[cfg.base_dtype])
        self.few_step.to(device)
        # the progressive stage (0-based), when it began (update, seconds), and the last stage whose end was checked
        self.stage, self.began, self.checked_end = 0, (0, 0.0), -1

    def rollout(self, chain, x, generator):
        """:func:`short_chain` at the current stage; the few-step model bound to the chain's conditioning."""
        bound = chain.denoiser
        few = Denoiser(self.few_step, bound.cond, bound.uncond, bound.guidance_scale)
        return short_chain(chain, few, x, self.ends, stage=self.stage)

    def stage_over(self, run) -> bool:
        """Whether the current stage has had its share: the updates (or, if further, the seconds) left when it
        began, split equally over it and the stages after it (k equal shares when no stage was held)."""
        cfg, left = self.cfg, self.cfg.segments - self.stage
        began_step, began_seconds = self.began
        done = (run.step - began_step) / max(cfg.updates - began_step, 1) * left
        if cfg.time_budget is not None:
            done = max(done, (run.seconds - began_seconds) / max(cfg.time_budget - began_seconds, 1e-9) * left)
        return done >= 1 - 1e-9

    def before_update(self, run) -> dict:
        """The next update's stage. Its LoRA is frozen when the stage ends, so with the hacking guard on it is
        checked first, and a LoRA the guard's last check failed (``run.guard_failing``) is not frozen: the stage goes
        on, to be checked again at the guard's next check (stage 1 often ends inside the overshoot of its first
        updates, and the later stages can only compensate for a frozen segment-1 LoRA; docs/shortft.md)."""
        record = {}
        if self.cfg.progressive and self.stage < self.cfg.segments - 1 and self.stage_over(run):
            if run.guard is not None and self.checked_end != self.stage:
                self.checked_end = self.stage
                record["stage_check"] = run.guard_check().record()
            if run.guard is None or not run.guard_failing:
                self.stage += 1
                self.began = (run.step, run.seconds)
        for j, params in enumerate(self.adapter_params):
            for p in params:
                p.requires_grad_(j >= self.stage)
        return {**record, "stage": self.stage + 1}

    def state(self) -> dict:
        return {"stage": self.stage, "began": list(self.began), "checked_end": self.checked_end}

    def load_state(self, state: dict) -> None:
        if state:
            self.stage, self.began, self.checked_end = state["stage"], tuple(state["began"]), state["checked_end"]

    def scaled(self, scale):
        return self.timestep_lora.scaled(scale)

    def save(self, folder: Path) -> None:
        super().save(folder)
        write_json(folder / "shortft.json", {"adapters": self.timestep_lora.adapters,
                                             "timesteps": self.timestep_lora.timesteps, "steps": self.cfg.steps})


def load_shortft(model: torch.nn.Module, folder: str | os.PathLike) -> TimestepLoRA:
    """``model`` with the per-segment LoRAs of a ShortFT run (``folder``: the run's ``lora``) loaded as frozen
    adapters, wrapped in :class:`TimestepLoRA`: sample it with any chain (inference on the original chain)."""
    folder = Path(folder)
    meta_path = folder / "shortft.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: give the `lora` folder of a ShortFT run")
    meta = json.loads(meta_path.read_text())
    for name in meta["adapters"]:
        load_lora(model, folder / name, adapter_name=name)
    return TimestepLoRA(model, meta["adapters"], meta["timesteps"])
