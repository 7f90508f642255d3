"""ShortFT (sdo.finetuning.shortft): the short chain against the base chain (exact for an exact shortcut, bounded for
the shipped student), its gradient against a hand-written loop, gradients reaching exactly the trainable LoRAs,
progressive stages, resume, inference on the original chain with per-timestep LoRAs, and the command line."""

import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from safetensors.torch import load_file

import sdo
from sdo.finetuning.checkpoints import load_checkpoint
from sdo.finetuning.lora import add_lora, lora_parameters, set_lora_scale
from sdo.finetuning.shortft import TimestepLoRA, adapter_names, load_shortft, segment_ends, short_chain
from sdo.recipes.finetune_tasks import digits_task
from sdo.solvers import solver_from_scheduler

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"steps": 8, "segments": 4, "batch_size": 2, "sample_every": 0, "eval_count": 2, "sample_count": 2,
         "eval_scales": (1.0,), "progress": False, "cpu": True, "lr": 1e-2, "guard_every": 0}


def _task(digits, judge, **kwargs):
    """A digits task on a fresh copy of the UNet, its few-step model a frozen copy of the teacher (plain DDIM jumps)."""
    models = copy.copy(digits)
    models.unet = copy.deepcopy(digits.unet)
    task = digits_task(models=models, judge=judge, **kwargs)
    task.few_step = copy.deepcopy(digits.unet)
    return task


def _tiny_unet(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4)
    return unet.to(dtype).eval().requires_grad_(False)


def _stacked(unet, n, seed=0):
    """``n`` stacked LoRAs on ``unet`` with random B (so that A gets a gradient too)."""
    names = adapter_names(n)
    for j, name in enumerate(names):
        add_lora(unet, rank=2, adapter_name=name, init_seed=seed + j, target_modules=("to_q", "to_v", "conv1"))
        gen = torch.Generator().manual_seed(100 + j)
        with torch.no_grad():
            for p in lora_parameters(unet, name):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return names


class PointMass(torch.nn.Module):
    """The exact epsilon of data concentrated at one point x*: every DDIM jump is exact, so a shortcut through it
    lands on the base trajectory."""

    def __init__(self, scheduler, target):
        super().__init__()
        self.a = scheduler.alphas_cumprod.double()
        self.target = target

    def forward(self, x, t):
        a = self.a[t.long()].view(-1, *[1] * (x.ndim - 1)).to(x)
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()


def test_segment_ends():
    assert segment_ends(50, 4) == (11, 24, 36, 49)
    assert segment_ends(8, 8) == tuple(range(8)) and segment_ends(10, 1) == (9,)
    with pytest.raises(ValueError, match="segments <= steps"):
        segment_ends(4, 5)
    solver = solver_from_scheduler(DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False), 50)
    assert [int(solver.timesteps[e]) for e in segment_ends(50, 4)] == [760, 500, 260, 0]


def test_short_chain_is_exact_when_the_shortcut_is(digits):
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    target = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    chain = sdo.Chain.from_diffusers(PointMass(scheduler, target), scheduler, 20)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    base = sdo.sample(chain, x)
    ends = segment_ends(20, 4)
    for stage in range(4):
        out = short_chain(chain, chain.denoiser, x, ends, stage=stage)
        torch.testing.assert_close(out, base, rtol=1e-10, atol=1e-10)
    # a real model with nothing to jump over (one step per segment) is the base chain itself
    unet = _tiny_unet()
    chain = sdo.Chain.from_diffusers(unet, scheduler, 6)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(short_chain(chain, _tiny_unet(seed=5), x, segment_ends(6, 6)), sdo.sample(chain, x),
                               rtol=0, atol=0)


def test_short_chain_with_the_shipped_student_stays_near_the_base_chain(digits):
    from sdo.embedded import load_digits_student

    student = load_digits_student()
    card = student.sdo_card
    assert ((card["config"]["steps"], card["config"]["segments"]) == (50, 4)
            and card["lora_timesteps"] == [760, 500, 260, 0])
    labels = torch.tensor([10] * 16 + list(range(10)) * 2)
    cond = {"class_labels": labels}
    chain = sdo.Chain.from_diffusers(digits.unet, digits.scheduler, 50, cond=cond)
    x = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(123))
    ends = segment_ends(50, 4)
    with torch.no_grad():
        base = sdo.sample(chain, x)
        short = short_chain(chain, sdo.Denoiser(student, cond), x, ends)
        plain = short_chain(chain, chain.denoiser, x, ends)  # the teacher's own big DDIM jumps
    error = (short - base).flatten(1).norm(dim=1).mean() / base.flatten(1).norm(dim=1).mean()
    plain_error = (plain - base).flatten(1).norm(dim=1).mean() / base.flatten(1).norm(dim=1).mean()
    assert error < 0.08, f"short chain relative error {error:.3f}"
    assert error < plain_error, (float(error), float(plain_error))
    same = digits.classifier(short.clamp(-1, 1)).argmax(1) == digits.classifier(base.clamp(-1, 1)).argmax(1)
    assert same.float().mean() >= 0.9


def test_short_chain_gradient_equals_a_hand_written_loop():
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    unet, few = _tiny_unet(), _tiny_unet(seed=7)
    names = _stacked(unet, 3)
    solver = solver_from_scheduler(scheduler, 8)
    ends = (2, 5, 7)
    lora = TimestepLoRA(unet, names, [int(solver.timesteps[e]) for e in ends])
    chain = sdo.Chain(sdo.Denoiser(lora), solver)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    params = [p for n in names for p in lora_parameters(unet, n)]

    def grads(fn):
        for p in params:
            p.grad = None
        xr = x.clone().requires_grad_(True)
        (fn(xr) * weights).sum().backward()
        return [xr.grad] + [p.grad for p in params]

    def by_hand(z):  # stage 1 with ends (2, 5, 7): three base steps, jump 3 -> 5, step 5, jump 6 -> 7, step 7
        def eps(model, i, z, scales):
            for name, s in zip(names, scales, strict=True):
                set_lora_scale(unet, s, name)
            return model(z, solver.timesteps[i].expand(len(z))).sample

        for i in range(3):
            z = solver.step(i, z, eps(unet, i, z, (1, 0, 0)), None)[0]
        z = solver.jump(3, 5, z, eps(few, 3, z, (1, 0, 0)))
        z = solver.step(5, z, eps(unet, 5, z, (1, 1, 0)), None)[0]
        z = solver.jump(6, 7, z, eps(few, 6, z, (1, 1, 0)))
        out = solver.step(7, z, eps(unet, 7, z, (1, 1, 1)), None)[0]
        for name in names:
            set_lora_scale(unet, 1.0, name)
        return out

    expected = grads(by_hand)
    for use_checkpoint in (False, True):
        got = grads(lambda z, c=use_checkpoint: short_chain(chain, few, z, ends, use_checkpoint=c))
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in expected)


def test_gradients_reach_the_trainable_loras_and_only_them():
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    unet, few = _tiny_unet(dtype=torch.float32), _tiny_unet(seed=7, dtype=torch.float32)
    names = _stacked(unet, 4)
    solver = solver_from_scheduler(scheduler, 8)
    ends = segment_ends(8, 4)
    chain = sdo.Chain(sdo.Denoiser(TimestepLoRA(unet, names, [int(solver.timesteps[e]) for e in ends])), solver)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for stage in range(4):
        for j, name in enumerate(names):
            for p in lora_parameters(unet, name):
                p.requires_grad_(j >= stage)
                p.grad = None
        short_chain(chain, few, x, ends, stage=stage).square().mean().backward()
        for j, name in enumerate(names):
            for p in lora_parameters(unet, name):
                assert (p.grad is not None and p.grad.abs().sum() > 0) == (j >= stage), (stage, name)
        lora_ids = {id(p) for n in names for p in lora_parameters(unet, n)}
        assert all(p.grad is None for p in unet.parameters() if id(p) not in lora_ids)
        assert all(p.grad is None for p in few.parameters())


def test_timestep_lora_switches_stacked_adapters_by_timestep():
    unet = _tiny_unet()
    names = _stacked(unet, 3)
    lora = TimestepLoRA(unet, names, [700, 400, 1])
    assert [lora.segment(t) for t in (999, 700, 699, 400, 399, 1, 0)] == [0, 0, 1, 1, 2, 2, 2]
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    for t, active in ((900, 1), (500, 2), (10, 3)):
        for j, name in enumerate(names):
            set_lora_scale(unet, 1.0 if j < active else 0.0, name)
        expected = unet(x, t).sample
        for name in names:
            set_lora_scale(unet, 1.0, name)
        torch.testing.assert_close(lora(x, torch.tensor([t])).sample, expected, rtol=0, atol=0)
        with lora.scaled(0.0):
            torch.testing.assert_close(lora(x, torch.tensor([t])).sample, _plain(unet, x, t), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="decrease"):
        TimestepLoRA(unet, names, [1, 400, 700])


def _plain(unet, x, t):
    from sdo.finetuning.lora import lora_disabled

    with lora_disabled(unet):
        return unet(x, t).sample


def test_shortft_trains_the_right_loras_in_progressive_stages(digits, judge, tmp_path):
    cfg = sdo.FinetuneConfig(output=tmp_path / "run", strategy="shortft", updates=4, checkpoint_every=1,
                             keep_checkpoints=10, regularizer=1.0, **SMALL)
    result = sdo.finetuning.shortft(_task(digits, judge), cfg)
    assert [r["stage"] for r in result.metrics] == [1, 2, 3, 4]
    states = [load_checkpoint(p)[0] for p in sorted((tmp_path / "run" / "checkpoints").glob("step-*"))]
    assert len(states) == 4
    names = adapter_names(4)
    init = _task(digits, judge)
    from sdo.finetuning.trainer import TrainingRun  # the LoRAs as initialized (same seeds), before any update

    before = TrainingRun(init, cfg.__class__(**{**cfg.__dict__, "output": tmp_path / "init"})).method.tensors()
    for u, after in enumerate(states):  # update u+1 runs stage u+1: LoRAs u+1..4 move, earlier ones stay
        for j, name in enumerate(names):
            moved = any(not torch.equal(before[f"lora_{name}"][k], v) for k, v in after[f"lora_{name}"].items())
            assert moved == (j >= u), (u, name)
        before = after
    lora_dir = tmp_path / "run" / "lora"
    assert json.loads((lora_dir / "shortft.json").read_text())["timesteps"] == [int(t) for t in
                                                                                 _timesteps(digits, 8, 4)]
    for name in names:
        assert load_file(str(lora_dir / name / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("verdicts", [[False, False, True], [True]])
def test_a_stage_does_not_end_while_the_guard_fails_its_lora(digits, judge, tmp_path, verdicts):
    """The guard checks after updates 3, 6 and 8 and at stage 1's end (before update 5): a LoRA it rejects is not
    frozen; the stage goes on until a check passes. ``verdicts``: the checks' outcomes in order (then passing)."""
    task, outcomes = _task(digits, judge), iter([True, *verdicts])  # the first call judges the base samples

    def scripted(images, conditions):  # the judge's verdicts in order; then everything passes (the evaluation too)
        return {"judge_rejected": 0.0 if next(outcomes, True) else 1.0}

    task.describe = scripted
    cfg = sdo.FinetuneConfig(output=tmp_path / "run", strategy="shortft", updates=8, checkpoint_every=1,
                             keep_checkpoints=10, regularizer=1.0, **{**SMALL, "segments": 2, "guard_every": 3,
                                                                      "guard_count": 4})
    result = sdo.finetuning.shortft(task, cfg)
    stages = [r["stage"] for r in result.metrics]
    checked = [r["update"] for r in result.metrics if "stage_check" in r]
    if verdicts[0]:  # passing: stage 1 ends on time, after its check
        assert stages == [1, 1, 1, 1, 2, 2, 2, 2] and checked == [5]
    else:  # failed after update 3 and at the stage's end: held until the check after update 6 passes
        assert stages == [1, 1, 1, 1, 1, 1, 2, 2] and checked == [5]
        assert result.metrics[4]["stage_check"]["failed"] and not result.metrics[5]["guard"]["failed"]
    states = [load_checkpoint(p)[0] for p in sorted((tmp_path / "run" / "checkpoints").glob("step-*"))]
    first = [s["lora_segment_1"] for s in states]
    moved = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in itertools.pairwise(first)]
    assert moved == [s == 1 for s in stages[1:]]  # LoRA 1 moves exactly in stage 1's updates


def _timesteps(digits, steps, segments):
    solver = solver_from_scheduler(digits.scheduler, steps)
    return [solver.timesteps[e] for e in segment_ends(steps, segments)]


def _rejecting(digits, judge):
    """A task whose judge rejects every sample but the base model's (the first it sees in a process: the guard's)."""
    task, seen = _task(digits, judge), []

    def describe(images, conditions):
        if not seen:
            seen.append(images)
        return {"judge_rejected": 0.0 if torch.equal(images, seen[0]) else 1.0}

    task.describe = describe
    return task


@pytest.mark.parametrize("guard", [0, 1])
def test_shortft_resumes_to_the_same_loras(digits, judge, tmp_path, guard):
    """Also with the guard checking every update and failing (stage 1 held from its end on, across the resume)."""
    cfg = dict(strategy="shortft", updates=4, checkpoint_every=2, **{**SMALL, "guard_every": guard, "guard_count": 4})
    make = (lambda: _rejecting(digits, judge)) if guard else (lambda: _task(digits, judge))
    whole = sdo.finetune(make(), sdo.FinetuneConfig(output=tmp_path / "a", **cfg))
    task, calls = make(), []
    reward = task.reward

    def interrupted(images, conditions):  # the run is interrupted in its third update
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return reward(images, conditions)

    task.reward = interrupted
    with pytest.raises(KeyboardInterrupt):
        sdo.finetune(task, sdo.FinetuneConfig(output=tmp_path / "b", **cfg))
    resumed = sdo.finetune(make(), sdo.FinetuneConfig(output=tmp_path / "b", resume=True, **cfg))
    assert [r["stage"] for r in resumed.metrics] == [r["stage"] for r in whole.metrics] == (
        [1, 1, 1, 1] if guard else [1, 2, 3, 4])
    assert [r.get("stage_check") for r in resumed.metrics] == [r.get("stage_check") for r in whole.metrics]
    for name in adapter_names(4):
        a = load_file(str(tmp_path / "a" / "lora" / name / "pytorch_lora_weights.safetensors"))
        b = load_file(str(tmp_path / "b" / "lora" / name / "pytorch_lora_weights.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_inference_is_the_base_chain_with_per_timestep_loras(digits, judge, tmp_path):
    cfg = sdo.FinetuneConfig(output=tmp_path / "run", strategy="shortft", updates=2, progressive=False, **SMALL)
    sdo.finetuning.shortft(_task(digits, judge), cfg)
    unet = copy.deepcopy(digits.unet)
    model = load_shortft(unet, tmp_path / "run" / "lora")
    calls = []
    unet.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    cond = {"class_labels": torch.full((4,), 10)}
    with torch.no_grad():
        out = sdo.sample(sdo.Chain.from_diffusers(model, digits.scheduler, 20, cond=cond), x)
    assert len(calls) == 20  # the original chain: one call per step, nothing extra
    # by hand: the same adapters loaded into another copy, each step with the LoRAs of its segment switched on
    ref = copy.deepcopy(digits.unet)
    names = adapter_names(4)
    for name in names:
        sdo.finetuning.lora.load_lora(ref, tmp_path / "run" / "lora" / name, adapter_name=name)
    bounds = [int(t) for t in _timesteps(digits, 8, 4)]
    solver = solver_from_scheduler(digits.scheduler, 20)
    z = x
    with torch.no_grad():
        for i, t in enumerate(solver.timesteps.tolist()):
            segment = next((j for j, b in enumerate(bounds) if t >= b), 3)
            for j, name in enumerate(names):
                set_lora_scale(ref, 1.0 if j <= segment else 0.0, name)
            z = solver.step(i, z, ref(z, t, class_labels=cond["class_labels"]).sample, None)[0]
    torch.testing.assert_close(out, z, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, sdo.sample(sdo.Chain.from_diffusers(digits.unet, digits.scheduler, 20, cond=cond), x)
                              .detach(), atol=1e-4)


def test_errors(digits, judge, tmp_path):
    task = _task(digits, judge)
    task.few_step = None
    with pytest.raises(ValueError, match="few-step model"):
        sdo.finetuning.shortft(task, sdo.FinetuneConfig(output=tmp_path / "a", **SMALL))
    task = _task(digits, judge)
    from sdo.embedded import load_digits_student

    task.few_step = load_digits_student()
    with pytest.raises(ValueError, match="distilled for steps=50, segments=4"):
        sdo.finetuning.shortft(task, sdo.FinetuneConfig(output=tmp_path / "b", **SMALL))
    with pytest.raises(ValueError, match="eta must be 0"):
        sdo.FinetuneConfig(output=tmp_path / "c", strategy="shortft", eta=0.5)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2")
    chain = sdo.Chain.from_diffusers(_tiny_unet(), scheduler, 8)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="deterministic first-order"):
        short_chain(chain, _tiny_unet(), x, (3, 7))
    chain = sdo.Chain.from_diffusers(_tiny_unet(), DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False),
                                     8)
    with pytest.raises(ValueError, match="end at the last step"):
        short_chain(chain, _tiny_unet(), x, (3, 6))
    with pytest.raises(ValueError, match="stage must be"):
        short_chain(chain, _tiny_unet(), x, (3, 7), stage=2)


def test_cli_shortft_on_the_embedded_student(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "sdo", "shortft", "--output", str(out), "--updates", "1", "--batch-size", "1",
           "--eval-count", "1", "--sample-count", "1", "--eval-scales", "1", "--sample-every", "0", "--no-progress",
           "--cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 1 and "1" in summary["evaluation"]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["stage"] == 1
    assert json.loads((out / "lora" / "shortft.json").read_text())["timesteps"] == [760, 500, 260, 0]
    bad = subprocess.run(cmd[:4] + ["--strategy", "sdo", "--output", str(tmp_path / "x")], env=env,
                         capture_output=True, text=True, check=False, timeout=120)
    assert bad.returncode == 2 and "sdo shortft runs strategy shortft" in bad.stderr


def test_cli_shortft_on_a_pipeline_with_a_few_step_folder(pipeline_folder, clip, tokenizer, tiny_sd, tmp_path):
    """`sdo shortft --model --few-step`: a text-to-image pipeline whose few-step model is a saved UNet folder (as a
    UNet with a Hyper-SD LoRA fused in would be); the few-step model is the one the chain jumps with."""
    from sdo.cli import main

    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    unet = copy.deepcopy(tiny_sd[0])
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    unet.save_pretrained(tmp_path / "few")
    tiny_sd[0].save_pretrained(tmp_path / "same")
    first = {}
    for few in ("few", "same"):
        out = tmp_path / f"run-{few}"
        code = main(["shortft", "--model", str(pipeline_folder), "--few-step", str(tmp_path / few), "--clip",
                     str(tmp_path / "clip"), "--prompts", "a red square|a blue circle", "--steps", "6", "--segments",
                     "2", "--updates", "2", "--batch-size", "2", "--lr", "0.05", "--guidance-scale", "3",
                     "--sample-every", "0", "--eval-count", "2", "--eval-scales", "1", "--no-progress", "--cpu",
                     "--output", str(out)])
        assert code == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["stage"] for r in records] == [1, 2] and all(r["grad_norm"] > 0 for r in records)
        assert all((out / "lora" / name / "pytorch_lora_weights.safetensors").is_file() for name in adapter_names(2))
        first[few] = records[0]["reward_mean"]
    assert first["few"] != first["same"]


def test_student_distillation_lowers_the_jump_error_and_round_trips(tmp_path):
    """`train_student` (what `sdo train student` runs), tiny: the card's figures exist, the student's jumps beat
    the teacher's own DDIM jumps on held-out trajectories, and the written folder loads."""
    from sdo.embedded import load_digits_student
    from sdo.embedded.student import StudentConfig, train_student

    cfg = StudentConfig(trajectories=32, eval_trajectories=32, train_steps=30, batch=32, lr=1e-3)
    card = train_student(tmp_path, cfg, progress=False)
    jumps = card["held_out"]["jumps"]
    assert [(j["from_t"], j["to_t"]) for j in jumps] == [(740, 500), (480, 260), (240, 0)]
    assert sum(j["jump"] for j in jumps) < sum(j["ddim_jump"] for j in jumps)
    agreement = card["held_out"]["classifier_agreement"] * cfg.eval_trajectories  # a count of the 32 held out
    assert len(card["held_out"]["short_chain"]) == 3 and agreement == round(agreement)
    # the student starts as the teacher, whose own jumps already keep the digit on most trajectories
    assert agreement >= 0.75 * cfg.eval_trajectories
    student = load_digits_student(folder=tmp_path)
    assert student.sdo_card["config"]["train_steps"] == 30 and not any(p.requires_grad for p in student.parameters())
