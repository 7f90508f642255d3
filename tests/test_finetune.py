"""LoRA reward fine-tuning (sdo.finetune, sdo.finetuning): the gradient of one update against hand-written loops,
skipped non-finite updates, kill-and-resume equality, 2-process Accelerate equality, DRaFT+'s penalty, the judge,
the command line, and a text-to-image pipeline task."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sdo
from sdo.finetuning import FinetuneConfig, NonFiniteError, finetune
from sdo.finetuning.lora import lora_parameters
from sdo.finetuning.lora_files import read_lora
from sdo.objectives.rewards import ClassLogProb, InkReward, WeightedReward
from sdo.recipes.finetune_tasks import digits_task, pipeline_task

SMALL = {"steps": 8, "batch_size": 2, "sample_every": 0, "eval_count": 4, "eval_scales": (1.0,), "progress": False,
         "cpu": True}
ROOT = Path(__file__).resolve().parents[1]


def _task(digits, judge, **kwargs):
    """A fresh copy of the embedded UNet (finetune adds a LoRA in place) in a digits task."""
    import copy

    models = copy.copy(digits)
    models.unet = copy.deepcopy(digits.unet)
    return digits_task(models=models, judge=judge, **kwargs)


def _lora(folder: Path) -> dict:
    return load_file(str(folder / "lora" / "pytorch_lora_weights.safetensors"))


def _assert_same(a: dict, b: dict, **tol):
    assert a.keys() == b.keys() and a
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], **tol)


@pytest.mark.parametrize("strategy,kw", [("sdo", {}), ("truncated", {"k": 2}), ("random-truncated", {}),
                                         ("checkpoint", {})])
def test_updates_equal_hand_written_loop(digits, judge, tmp_path, strategy, kw):
    """Three updates of each strategy, with DRaFT+'s penalty, move the LoRA exactly as AdamW on the gradients of a
    hand-written loop that keeps the graphs of the same denoiser calls (SDO: the one step its generator draws) and
    adds w * mean((tuned - base)^2) / alpha_bar_t over those calls (DRaFT+'s eps penalty plus the same change in
    x0_hat, for this epsilon model)."""
    from sdo.finetuning.lora import add_lora, lora_disabled
    from sdo.finetuning.trainer import _strategy

    task = _task(digits, judge)
    cfg = FinetuneConfig(output=tmp_path, strategy=strategy, updates=3, max_grad_norm=None, lr=1e-2, regularizer=5.0,
                         **kw, **SMALL)
    result = finetune(task, cfg)
    ref = _task(digits, judge)  # the same seeded LoRA init, the same draws, a plain loop
    add_lora(ref.model, rank=cfg.rank, target_modules=cfg.target_modules, init_seed=cfg.seed)
    params = lora_parameters(ref.model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    data = torch.Generator().manual_seed(cfg.seed * 1000)
    chooser = _strategy(cfg, torch.Generator().manual_seed(cfg.seed * 1000 + 1))
    for update in range(cfg.updates):
        index = torch.randint(len(ref.conditions), (2,), generator=data)
        x = torch.randn(2, 1, 16, 16, generator=data)
        labels = [ref.conditions[int(i)] for i in index]
        keep = chooser.select(range(cfg.steps))
        chain = sdo.Chain.from_diffusers(ref.model, ref.scheduler, cfg.steps,
                                         cond={"class_labels": torch.tensor(labels)})
        state, penalties = chain.init_state(x), []
        for i in range(cfg.steps):
            with torch.set_grad_enabled(i in keep):
                out = chain.denoise(i, x)
            if i in keep:
                with torch.no_grad(), lora_disabled(ref.model):
                    base = chain.denoise(i, x)
                alpha_bar = float(ref.scheduler.alphas_cumprod[int(chain.timesteps[i])])
                penalties.append(((out - base) ** 2).mean() / alpha_bar)
            x, state = chain.update(i, x, out, state)
        penalty = torch.stack(penalties).mean()
        loss = -ref.reward(x, labels).mean() + cfg.regularizer * penalty
        grads = torch.autograd.grad(loss, params)
        assert sum(g.abs().sum() for g in grads) > 0
        assert math.isclose(result.metrics[update]["penalty"], float(penalty.detach()), rel_tol=1e-4, abs_tol=1e-9)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
    assert result.metrics[-1]["penalty"] > 0  # the LoRA moved, so the penalty's gradient was in play
    for a, b in zip(lora_parameters(task.model), params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)  # float32 round-off, amplified by Adam where g ~ 0


def test_strategies_keep_the_right_calls():
    from sdo.finetuning.trainer import _strategy

    g = torch.Generator().manual_seed(0)
    cfg = lambda **kw: FinetuneConfig(output="unused", steps=50, **kw)
    assert len(_strategy(cfg(strategy="sdo"), g).select(range(50))) == 1
    assert list(_strategy(cfg(strategy="truncated", k=3), g).select(range(50))) == [47, 48, 49]
    uniform = _strategy(cfg(strategy="random-truncated"), g)
    assert uniform.checkpoint and uniform.high == 50
    sizes = {len(uniform.select(range(50))) for _ in range(200)}
    assert min(sizes) < 10 and max(sizes) > 40  # k ~ U{1..N}, one k per trajectory
    with pytest.raises(ValueError, match="strategy must be one of .*sdo.*alignprop"):
        cfg(strategy="alignprop")


class _Flaky:
    """A reward that is NaN on the given calls."""

    def __init__(self, reward, bad):
        self.reward, self.bad, self.calls = reward, set(bad), 0

    def __call__(self, images, conditions):
        self.calls += 1
        r = self.reward(images, conditions)
        return r * math.nan if self.calls in self.bad or "all" in self.bad and self.calls > 3 else r


def test_non_finite_updates_are_skipped_and_counted(digits, judge, tmp_path):
    task = _task(digits, judge)
    task.reward = _Flaky(task.reward, {2, 4})
    result = finetune(task, FinetuneConfig(output=tmp_path, updates=5, **SMALL))
    assert result.skipped == 2 and [m["skipped"] for m in result.metrics] == [False, True, False, True, False]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_total"] for m in logged] == [0, 1, 1, 2, 2]
    assert all(torch.isfinite(p).all() for p in lora_parameters(task.model))
    state = load_file(str(tmp_path / "checkpoints" / "step-0000005" / "optimizer.safetensors"))
    assert {float(v) for k, v in state.items() if k.endswith(".step")} == {3.0}  # AdamW stepped 3 times


def test_too_many_non_finite_updates_stop_with_the_last_checkpoint(digits, judge, tmp_path):
    task = _task(digits, judge)
    task.reward = _Flaky(task.reward, {"all"})
    with pytest.raises(NonFiniteError, match="3 updates in a row.*last good checkpoint"):
        finetune(task, FinetuneConfig(output=tmp_path, updates=20, max_nonfinite=3, checkpoint_every=3, **SMALL))
    pointer = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert pointer["step"] == 3  # updates 4-6 failed; nothing after the good checkpoint was written
    lora = load_file(str(tmp_path / "checkpoints" / pointer["path"] / "lora.safetensors"))
    assert all(torch.isfinite(v).all() for v in lora.values())


def test_reward_shape_and_resume_errors(digits, judge, tmp_path):
    task = _task(digits, judge)
    task.reward = lambda images, conditions: images.mean()
    with pytest.raises(ValueError, match=r"reward returned shape \(\)"):
        finetune(task, FinetuneConfig(output=tmp_path / "a", updates=1, **SMALL))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        finetune(_task(digits, judge), FinetuneConfig(output=tmp_path / "b", updates=1, resume=True, **SMALL))
    finetune(_task(digits, judge), FinetuneConfig(output=tmp_path / "c", updates=1, **SMALL))
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(_task(digits, judge), FinetuneConfig(output=tmp_path / "c", updates=2, **SMALL))
    shutil.rmtree(tmp_path / "c" / "checkpoints")  # a finished run whose checkpoints were pruned is still a run
    with pytest.raises(FileExistsError, match=r"holds a run \(metrics.jsonl, config.json, summary.json, lora\)"):
        finetune(_task(digits, judge), FinetuneConfig(output=tmp_path / "c", updates=2, **SMALL))
    with pytest.raises(ValueError, match="base_dtype must be one of"):
        FinetuneConfig(output=tmp_path / "d", base_dtype="int8")


def _cli(*args, env=None, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "sdo", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


RUN = ["finetune", "--steps", "8", "--batch-size", "2", "--sample-every", "0", "--eval-count", "2",
       "--eval-scales", "1", "--no-progress", "--cpu", "--lr", "0.01"]


def test_killed_run_resumes_to_the_same_weights(digits, judge, tmp_path):
    """SIGKILL mid-training, then --resume: the same LoRA as an uninterrupted run (and the log has one record
    per update, none duplicated by the replay)."""
    updates = 24
    killed = _cli(*RUN, "--updates", str(updates), "--checkpoint-every", "4", "--output", str(tmp_path / "killed"))
    pointer = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 8:
            break
        time.sleep(0.02)
    assert killed.poll() is None, "the run ended before it could be killed: make it longer"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    step = json.loads(pointer.read_text())["step"]
    assert 8 <= step < updates
    # options from the run
    resumed = _cli("finetune", "--output", str(tmp_path / "killed"), "--resume", "--no-progress")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    cfg = FinetuneConfig(output=tmp_path / "whole", updates=updates, checkpoint_every=4, lr=0.01,
                         **{**SMALL, "eval_count": 2})
    finetune(_task(digits, judge), cfg)
    _assert_same(_lora(tmp_path / "killed"), _lora(tmp_path / "whole"), rtol=1e-5, atol=1e-7)
    logged = [json.loads(line)["update"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, updates + 1))


@pytest.mark.parametrize("command,steps", [("finetune", "8"), ("shortft", "50")])
def test_two_processes_equal_one(command, steps, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo), global batch 4: every update's gradient (its norm, logged
    before any clipping; none here) equals a one-process run's with the same global batch and seed, so a summed
    instead of averaged gradient (2x, which Adam's normalization would hide in the weights) fails; the LoRA is
    identical on both ranks and equals the one-process LoRA (ShortFT: its four LoRAs, over three stages)."""
    common = [command, "--steps", steps, *RUN[3:], "--updates", "3", "--batch-size", "4", "--checkpoint-every", "10",
              "--max-grad-norm", "none"]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29581", "-m", "sdo", *common, "--output", str(tmp_path / "two")]
    two = subprocess.run(launch, env={**os.environ, **env}, capture_output=True, text=True, check=False,
                         timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = _cli(*common, "--output", str(tmp_path / "one"))
    out, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["rank_max_abs_diff"] == 0.0
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["processes"] == 1
    norms = [[json.loads(line)["grad_norm"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("one", "two")]
    assert len(norms[0]) == 3 and min(norms[0]) > 0
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)  # averaged over the processes, as one process computes it
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "lora").rglob("*.safetensors"))
    assert len(files) == (4 if command == "shortft" else 1)
    for file in files:
        one, two = load_file(str(tmp_path / "one" / file)), load_file(str(tmp_path / "two" / file))
        # ShortFT backpropagates through ~18 calls of a 50-step chain: float sums in another order move a weight
        # whose gradient is near zero by up to ~1e-4 through Adam's normalization (weights here are ~1e-2)
        _assert_same(two, one, rtol=1e-4, atol=1e-6 if command == "finetune" else 5e-4)
        assert any((v != 0).any() for k, v in one.items() if "lora_B" in k)


def test_cli_refusal_leaves_the_earlier_run_as_it_was(tmp_path):
    """A refused `sdo finetune` into an existing run once rewrote its command.json first (the next --resume then
    crashed or silently changed settings); now it is refused before anything is written, and a bad option is
    refused before command.json exists."""
    import hashlib

    from sdo.cli import main

    run = tmp_path / "run"
    assert main([*RUN, "--updates", "1", "--eval-count", "2", "--output", str(run)]) == 0

    def digest():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()}

    before = digest()
    for extra in (["--rank", "8"], ["--lr", "0.5", "--max-grad-norm", "none"], ["--updates", "2"]):
        assert main([*RUN, *extra, "--output", str(run)]) == 2, extra
        assert digest() == before, extra
    assert main([*RUN, "--warmup", "5", "--output", str(tmp_path / "new")]) == 2  # warm-up with a constant lr
    assert not (tmp_path / "new" / "command.json").exists()


def test_cli_config_file_and_flags(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('strategy = "truncated"\nk = 2\nupdates = 1\nrank = 2\nreward = "class+ink"\ntarget = 7\n')
    proc = _cli("finetune", "--config", str(config), "--steps", "4", "--batch-size", "2", "--sample-every", "1",
                "--sample-count", "2", "--eval-count", "2", "--eval-scales", "0,1", "--no-progress", "--tensorboard",
                "--output", str(tmp_path / "out"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["strategy"], saved["k"], saved["rank"], saved["steps"]) == ("truncated", 2, 2, 4)
    assert set(json.loads((tmp_path / "out" / "summary.json").read_text())["evaluation"]) == {"0", "1"}
    _, lora_config = read_lora(tmp_path / "out" / "lora")
    assert lora_config["r"] == 2
    assert list((tmp_path / "out" / "tensorboard").rglob("events.out.tfevents.*"))
    for picture in ("reward.png", "final.png", "samples/step-0000001.png"):
        assert (tmp_path / "out" / picture).stat().st_size > 1000
    (tmp_path / "bad.json").write_text('{"learning_rate": 1}')
    proc = _cli("finetune", "--config", str(tmp_path / "bad.json"), "--output", str(tmp_path / "bad"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "unknown fine-tuning option(s) learning_rate" in out


def test_cli_fields_match_the_config():
    from dataclasses import fields

    from sdo.cli import finetune as c

    parsed = set(c._INT) | set(c._FLOAT) | set(c._OPTIONAL_FLOAT) | set(c._TUPLE) | set(c._CHOICES) | set(c._FLAGS)
    fixed = {"output", "strategy", "lr_scheduler", "progress", "progressive"}
    assert parsed | fixed == {f.name for f in fields(FinetuneConfig)}


def test_one_name_table_serves_sampling_finetuning_and_the_benchmark(tmp_path):
    """A gradient method registered once is known by name to sample/optimize_latent, finetune and sdo bench, each
    set up as the table says (SDO: the first step for a latent, a random one for weights); a method that does
    not train weights here is refused by finetune with the list of those that do."""
    from sdo.cli.bench import bench_rows
    from sdo.finetuning.trainer import _strategy
    from sdo.gradients import base, strategy_for

    @sdo.register_strategy("test-full-copy")
    class FullCopy(sdo.Full):
        pass

    try:
        cfg = FinetuneConfig(output=tmp_path, strategy="test-full-copy")
        assert isinstance(_strategy(cfg, torch.Generator()), FullCopy)
        assert "test-full-copy" in bench_rows() and isinstance(sdo.get_strategy("test-full-copy"), FullCopy)
    finally:
        base._REGISTRY.pop("test-full-copy")
    assert strategy_for("sdo", steps=5).at == "first" and strategy_for("sdo", weights=True, steps=5).at == "random"
    assert strategy_for("random-truncated", weights=True, steps=7).high == 7
    with pytest.raises(sdo.UsageError, match="strategy must be one of .*sdo.*; got 'adjoint'"):
        FinetuneConfig(output=tmp_path, strategy="adjoint")


def test_judge_reads_real_digits_and_rejects_textures(judge):
    from sdo.embedded.digits import load_dataset

    assert judge.accuracy > 0.97  # held-out real digits
    images, labels = load_dataset("test")
    assert (judge(images) == labels).float().mean() > 0.97
    g = torch.Generator().manual_seed(0)
    textures = -0.2 + 0.3 * torch.randn(16, 1, 16, 16, generator=g)
    assert (judge(textures) == -1).all()
    assert judge.read(images[:10], int(labels[0]))["judge_target"] > 0


def test_rewards(digits):
    images = torch.zeros(3, 1, 16, 16, requires_grad=True)
    logp = ClassLogProb(digits.classifier, 3)(images, [10, 10, 10])
    assert logp.shape == (3,) and (logp <= 0).all()
    own = ClassLogProb(digits.classifier)(images, [1, 2, 3])
    assert torch.allclose(own[2], logp[2])
    ink = InkReward()(images, [0, 0, 0])
    torch.testing.assert_close(ink, torch.full((3,), 128 / 78.0))
    both = WeightedReward([(ClassLogProb(digits.classifier, 3), 1.0), (InkReward(), 0.5)])(images, [0] * 3)
    torch.testing.assert_close(both, logp + 0.5 * ink)
    both.sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one value per image"):
        WeightedReward([(lambda i, c: i.sum(), 1.0)])(images, [0] * 3)


def test_half_precision_base_keeps_a_float32_lora(digits, judge, tmp_path):
    task = _task(digits, judge)
    result = finetune(task, FinetuneConfig(output=tmp_path, updates=2, base_dtype="bfloat16", **SMALL))
    assert all(p.dtype == torch.float32 for p in lora_parameters(task.model))
    assert next(task.model.conv_in.parameters()).dtype == torch.bfloat16
    assert result.skipped == 0 and all(math.isfinite(m["reward_mean"]) for m in result.metrics)


def test_time_budget_stops_early(digits, judge, tmp_path):
    result = finetune(_task(digits, judge), FinetuneConfig(output=tmp_path, updates=1000, time_budget=1e-3, **SMALL))
    assert result.updates == 1


def test_pipeline_task_on_tiny_stable_diffusion(pipeline_folder, clip, tokenizer, tmp_path):
    """A text-to-image pipeline folder: LoRA on the UNet2DConditionModel, VAE decoding in the graph, a CLIP reward
    per prompt, classifier-free guidance; the LoRA reloads into the pipeline's UNet with diffusers' own loader."""
    from sdo import backbones
    from sdo.objectives.clip import CLIPTextSimilarity

    pipe = backbones.load_pipeline(pipeline_folder)

    def reward(images, prompts):
        return 1 - CLIPTextSimilarity(clip, list(prompts), tokenizer)(images)

    task = pipeline_task(pipe, ["a red square", "a blue circle"], reward, guidance_scale=3.0)
    cfg = FinetuneConfig(output=tmp_path, updates=2, guidance_scale=3.0, lr=0.05, **{**SMALL, "steps": 3})
    result = finetune(task, cfg)
    assert result.skipped == 0 and all(m["grad_norm"] > 0 for m in result.metrics)
    from diffusers import StableDiffusionPipeline

    fresh = StableDiffusionPipeline.from_pretrained(pipeline_folder, local_files_only=True)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = task.encode(["a red square"])[0]
    with torch.no_grad():
        base = fresh.unet(x, 500, **cond).sample
        fresh.load_lora_weights(tmp_path / "lora", adapter_name="tuned")  # the pipeline's own loader reads it
        tuned = fresh.unet(x, 500, **cond).sample
        torch.testing.assert_close(tuned, task.model(x, 500, **cond).sample, rtol=1e-4, atol=1e-5)
    assert (tuned - base).abs().max() > 1e-4  # it changed the pipeline's output (keys without unet. did not)


def test_cli_pipeline_clip_reward(pipeline_folder, clip, tokenizer, tmp_path):
    """`sdo finetune --model --clip --prompts`: the CLIP score (100 cos) of each image against its own prompt, plus
    half the PickScore of the same tiny CLIP (--reward clip:1,pickscore:0.5); the run finishes with a finite reward
    in range and a LoRA gradient at every update."""
    from sdo.cli import main

    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    code = main(["finetune", "--model", str(pipeline_folder), "--clip", str(tmp_path / "clip"), "--prompts",
                 "a red square|a blue circle", "--steps", "2", "--updates", "2", "--batch-size", "2", "--lr", "0.05",
                 "--reward", "clip:1,pickscore:0.5", "--pickscore", str(tmp_path / "clip"),
                 "--guidance-scale", "3", "--sample-every", "0", "--eval-count", "2", "--eval-scales", "1",
                 "--no-progress", "--cpu", "--output", str(tmp_path / "run")])
    assert code == 0
    bound = 100 + 0.5 * clip.logit_scale.exp().item()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(math.isfinite(r["reward_mean"]) and abs(r["reward_mean"]) <= bound for r in records)
    assert all(r["grad_norm"] > 0 for r in records)
