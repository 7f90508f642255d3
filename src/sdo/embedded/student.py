"""The few-step student of the embedded digits DDPM: the shortcut of ShortFT (Guo et al., ICCV 2025).

ShortFT crosses most of each segment of the N-step DDIM chain with a trajectory-preserving few-step model. For
the digits DDPM the project distills one itself, segment by segment as Hyper-SD's trajectory-segmented
consistency distillation and PCM do: the N = 50 step chain is split into k = 4 segments ending at the LoRA steps
(:func:`sdo.finetuning.shortft.segment_ends`: steps 11, 24, 36, 49, timesteps 760, 500, 260, 0); from the latent before
any step i of a later segment the student lands, in one DDIM move (:meth:`sdo.solvers.Solver.jump`), on the
teacher's latent before the segment's last step. Training regresses that landing point on the teacher's own
deterministic trajectory (the 50-step DDIM sample of the same noise), starting from the teacher's weights.

``sdo train student`` retrains it; :func:`sdo.embedded.load_digits_student` loads the shipped weights, whose card
(``digits_student_card.json``) holds the measured trajectory error against the teacher at every boundary.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checks import UsageError
from .digits import IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, ema_step, unet_config

__all__ = ["StudentConfig", "jump_error", "load_student_weights", "teacher_trajectories", "train_student"]


@dataclass
class StudentConfig:
    seed: int = 0  # seeds the teacher's noise, the labels, the batches
    steps: int = 50  # the teacher's DDIM steps N
    segments: int = 4  # ShortFT's k: the student jumps across segments 2..k
    trajectories: int = 2048  # teacher trajectories to distill from
    train_steps: int = 2000  # optimizer steps
    batch: int = 64  # jumps per optimizer step
    lr: float = 2e-4  # AdamW, cosine decay after a 100-step warm-up; the student starts from the teacher
    ema_decay: float = 0.999  # EMA of the student's weights (the shipped weights)
    null_fraction: float = 0.5  # share of trajectories drawn unconditionally (the null class), the rest 0-9
    start_fraction: float = 0.5  # share of jumps from a segment's first step (ShortFT's); the rest from any step
    eval_trajectories: int = 512  # held-out trajectories for the card's figures


def _labels(n: int, null_fraction: float, generator: torch.Generator) -> torch.Tensor:
    labels = torch.randint(NUM_CLASSES, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < null_fraction] = NULL_CLASS
    return labels


def teacher_trajectories(unet, solver, x: torch.Tensor, labels: torch.Tensor, batch: int = 512,
                         progress: bool = True) -> torch.Tensor:
    """The deterministic chain's latents before every step and the sample: shape ``(n, N + 1, *x.shape[1:])``."""
    out = []
    with torch.no_grad():
        for xs, ys in tqdm(list(zip(x.split(batch), labels.split(batch), strict=True)), desc="teacher",
                           disable=not progress):
            path = [xs]
            for i in range(len(solver)):
                eps = unet(solver.model_input(i, xs), solver.timesteps[i], class_labels=ys).sample
                xs = solver.step(i, xs, eps, None)[0]
                path.append(xs)
            out.append(torch.stack(path, 1))
    return torch.cat(out)


def _jumps(ends: tuple[int, ...]) -> list[tuple[int, int]]:
    """(first step, last step) of every later segment that has a step to skip."""
    return [(ends[p - 1] + 1, ends[p]) for p in range(1, len(ends)) if ends[p] > ends[p - 1] + 1]


def _jump(model, solver, x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One DDIM move of each row from the latent before step ``i[r]`` to the one before step ``j[r]``."""
    eps = model(x, solver.timesteps[i], class_labels=labels).sample
    out = torch.empty_like(x)
    for a, b in {(int(a), int(b)) for a, b in zip(i, j, strict=True)}:
        rows = (i == a) & (j == b)
        out[rows] = solver.jump(a, b, x[rows], eps[rows])
    return out


def jump_error(model, unet, solver, paths: torch.Tensor, labels: torch.Tensor,
               ends: tuple[int, ...]) -> tuple[dict, torch.Tensor]:
    """Trajectory error against the teacher (relative RMSE: ||x - x_teacher|| / ||x_teacher||), per boundary:

    - ``jump``: one move of ``model`` from the teacher's latent at a segment's first step to its last step;
    - ``ddim_jump``: the same move with the teacher's own prediction (what distillation improves on);
    - ``short_chain``: ShortFT's chain (teacher steps through segment 1, then per segment a ``model`` jump and one
      teacher step), compared at every segment's last step and at the sample; ``sample_rmse`` in pixels [-1, 1].

    Returns the figures and the short chain's samples."""
    def rel(a, b):
        return float((a - b).flatten(1).norm(dim=1).mean() / b.flatten(1).norm(dim=1).mean())

    n = len(paths)
    report = {"jumps": []}
    with torch.no_grad():
        for a, b in _jumps(ends):
            ia, ib = torch.full((n,), a), torch.full((n,), b)
            report["jumps"].append({
                "from_step": a, "to_step": b, "from_t": int(solver.timesteps[a]), "to_t": int(solver.timesteps[b]),
                "jump": rel(_jump(model, solver, paths[:, a], ia, ib, labels), paths[:, b]),
                "ddim_jump": rel(_jump(unet, solver, paths[:, a], ia, ib, labels), paths[:, b])})
        x, boundaries = paths[:, 0], []
        for i in range(ends[0] + 1):
            x = solver.step(i, x, unet(x, solver.timesteps[i], class_labels=labels).sample, None)[0]
        for a, b in _jumps(ends):
            x = _jump(model, solver, x, torch.full((n,), a), torch.full((n,), b), labels)
            boundaries.append({"step": b, "t": int(solver.timesteps[b]), "relative_error": rel(x, paths[:, b])})
            x = solver.step(b, x, unet(x, solver.timesteps[b], class_labels=labels).sample, None)[0]
        report["short_chain"] = boundaries
        report["sample_relative_error"] = rel(x, paths[:, -1])
        report["sample_rmse"] = float((x - paths[:, -1]).pow(2).mean().sqrt())
    return report, x


def train_student(output: str | Path, cfg: StudentConfig | None = None, progress: bool = True) -> dict:
    """Distill the student, write ``digits_student.safetensors`` and ``digits_student_card.json`` into ``output``;
    returns the card."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel
    from safetensors.torch import save_file

    from ..finetuning.shortft import segment_ends
    from ..solvers import solver_from_scheduler
    from . import load_digits

    cfg = cfg or StudentConfig()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    torch.manual_seed(cfg.seed)
    models = load_digits()
    teacher = models.unet
    solver = solver_from_scheduler(models.scheduler, cfg.steps)
    ends = segment_ends(cfg.steps, cfg.segments)
    jumps = _jumps(ends)
    if not jumps:
        raise UsageError(f"{cfg.segments} segments of {cfg.steps} steps leave no step to jump over")
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (1, IMAGE_SIZE, IMAGE_SIZE)
    x = torch.randn(cfg.trajectories + cfg.eval_trajectories, *shape, generator=gen)
    labels = _labels(len(x), cfg.null_fraction, gen)
    paths = teacher_trajectories(teacher, solver, x, labels, progress=progress)
    teacher_seconds = time.perf_counter() - began
    train, held = slice(0, cfg.trajectories), slice(cfg.trajectories, None)

    student = UNet2DModel(**unet_config())
    student.load_state_dict(teacher.state_dict())
    student.train().requires_grad_(True)
    ema = EMAModel(student.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=1e-4)
    lr_at = lambda s: (min(1.0, (s + 1) / 100) * 0.5
                       * (1 + torch.cos(torch.tensor(s / cfg.train_steps * torch.pi)).item()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    starts, lasts = torch.tensor([a for a, _ in jumps]), torch.tensor([b for _, b in jumps])
    losses = []
    bar = tqdm(range(cfg.train_steps), desc="student", disable=not progress)
    for _ in bar:
        rows = torch.randint(cfg.trajectories, (cfg.batch,), generator=gen)
        seg = torch.randint(len(jumps), (cfg.batch,), generator=gen)
        first, last = starts[seg], lasts[seg]
        anywhere = first + (torch.rand(cfg.batch, generator=gen) * (last - first)).long()
        i = torch.where(torch.rand(cfg.batch, generator=gen) < cfg.start_fraction, first, anywhere)
        xi, target = paths[train][rows, i], paths[train][rows, last]
        loss = F.mse_loss(_jump(student, solver, xi, i, last, labels[train][rows]), target)
        ema_step(student, loss, opt, sched, ema, losses, bar)
    ema.copy_to(student.parameters())
    student.eval().requires_grad_(False)
    train_seconds = time.perf_counter() - began - teacher_seconds

    errors, short = jump_error(student, teacher, solver, paths[held], labels[held], ends)
    with torch.no_grad():
        said = models.classifier(short.clamp(-1, 1)).argmax(1)
        base = models.classifier(paths[held][:, -1].clamp(-1, 1)).argmax(1)
    errors["classifier_agreement"] = float((said == base).float().mean())
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, output / "digits_student.safetensors")
    card = {"config": asdict(cfg), "teacher_scheduler": "DDIMScheduler", "ends": list(ends),
            "lora_timesteps": [int(solver.timesteps[e]) for e in ends],
            "final_loss_mean_last_200": sum(losses[-200:]) / len(losses[-200:]),
            "held_out": errors, "held_out_trajectories": cfg.eval_trajectories,
            "seconds": {"teacher": teacher_seconds, "train": train_seconds, "total": time.perf_counter() - began},
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    (output / "digits_student_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def load_student_weights(folder: Path, device="cpu"):
    """``(student UNet2DModel, card)`` from a folder holding ``digits_student.safetensors`` and its card."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_model

    weights, card_path = folder / "digits_student.safetensors", folder / "digits_student_card.json"
    if not weights.is_file() or not card_path.is_file():
        raise FileNotFoundError(f"few-step student weights missing ({weights}); retrain with `sdo train student`")
    student = UNet2DModel(**unet_config())
    load_model(student, str(weights))
    return student.to(device).eval().requires_grad_(False), json.loads(card_path.read_text())
