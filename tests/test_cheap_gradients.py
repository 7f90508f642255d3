"""The cheap reward gradients of issue #20 (ReFL, DRaFT-LV, DRTune, Direct-Align), each against a hand-written loop
of its own formula over a diffusers scheduler, in float64 (to the float32 round-off of diffusers' coefficient
tables); and what a latent gets from the weights-only ones (a clear error)."""

import pytest
import torch
from diffusers import DDIMScheduler
from helpers import TinyNet

import sdo
from sdo.gradients import DirectAlign, DRaFTLV, DRTune, ReFL
from sdo.gradients.base import randint

F64 = {"rtol": 1e-9, "atol": 1e-12}
N = 8


def _tol(reference):
    """diffusers' DDIM computes its coefficients from float32 tables (sdo's solvers, in float64 from the same)."""
    return {"rtol": 2e-5, "atol": 2e-5 * max(r.abs().max().item() for r in reference)}


def _setup():
    model = TinyNet().double()
    chain = sdo.Chain.from_diffusers(model, DDIMScheduler(clip_sample=False), N)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return model, chain, x, weight


def _objective(x0, weight):
    return (torch.sin(x0) * weight.repeat(x0.shape[0] // weight.shape[0], 1, 1, 1)).sum()


def _scheduler():
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(N)
    return scheduler


def _call(model, x, t):
    return model(x, t.reshape(1).expand(x.shape[0]))


def test_refl_is_the_one_step_prediction_at_a_late_step_of_a_graphless_run():
    """ReFL: no graph up to a step t drawn from the last quarter, then x0_hat = the scheduler's
    pred_original_sample of that step's call; its weight gradient is the hand-written loop's."""
    model, chain, x, weight = _setup()
    params = list(model.parameters())
    ours = torch.autograd.grad(_objective(sdo.sample(chain, x, strategy=ReFL(generator=torch.Generator()
                                                                               .manual_seed(3))), weight), params)
    t_index = randint(N * 3 // 4, N - 1, torch.Generator().manual_seed(3))  # the same draw: steps 6..7 of 8
    scheduler, y = _scheduler(), x.clone()
    for i, t in enumerate(scheduler.timesteps):
        if i < t_index:
            with torch.no_grad():
                y = scheduler.step(_call(model, y, t), t, y).prev_sample
        else:
            x0_hat = scheduler.step(_call(model, y, t), t, y).pred_original_sample
            break
    reference = torch.autograd.grad(_objective(x0_hat, weight), params)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, **_tol(reference))
    assert sum(g.abs().sum() for g in ours) > 0
    draws = {next(iter(ReFL(generator=torch.Generator().manual_seed(s)).select(range(40)))) for s in range(200)}
    assert draws == set(range(30, 40))  # the paper's 40 steps: t in 30..39


def test_draft_lv_renoises_the_sample_n_times_and_runs_the_last_step_with_a_graph():
    """DRaFT-LV: x0 without a graph, then n times x1 = sqrt(abar) x0 + sqrt(1 - abar) eps at the last step's level
    and that step with its graph; n copies stacked along the batch; weight gradient equal to the loop's."""
    model, chain, x, weight = _setup()
    params = list(model.parameters())
    out = sdo.sample(chain, x, strategy=DRaFTLV(n=3, generator=torch.Generator().manual_seed(4)))
    assert out.shape == (6, 2, 4, 4)
    ours = torch.autograd.grad(_objective(out, weight), params)
    scheduler, y = _scheduler(), x.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            y = scheduler.step(_call(model, y, t), t, y).prev_sample
    last = scheduler.timesteps[-1]
    abar = scheduler.alphas_cumprod[last].double()
    generator, copies = torch.Generator().manual_seed(4), []
    for _ in range(3):
        eps = torch.randn(y.shape, generator=generator, dtype=torch.float32).double()
        x1 = abar.sqrt() * y + (1 - abar).sqrt() * eps
        copies.append(_scheduler().step(_call(model, x1, last), last, x1).prev_sample)
    reference = torch.autograd.grad(_objective(torch.cat(copies), weight), params)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, **_tol(reference))
    with pytest.raises(sdo.UsageError, match="draft-lv re-runs the last step.*DPMSolverPP"):
        from diffusers import DPMSolverMultistepScheduler

        dpm = sdo.Chain.from_diffusers(model, DPMSolverMultistepScheduler(), N)
        sdo.sample(dpm, x, strategy=DRaFTLV())


@pytest.mark.parametrize("seed", [8, 11])
def test_direct_align_injects_known_noise_and_recovers_the_image_with_it(seed):
    """Direct-Align: x0 without a graph; at a step t drawn uniformly over the whole chain, x_t = sqrt(abar_t) x0 +
    sqrt(1 - abar_t) eps with known eps, one DDIM step with its graph, then x0_hat = (x_{t+1} - sqrt(1 - abar_{t+1})
    eps) / sqrt(abar_{t+1}); the weight gradient equals the loop's (seeds 8 and 11 draw an early and a late t)."""
    model, chain, x, weight = _setup()
    params = list(model.parameters())
    out = sdo.sample(chain, x, strategy=DirectAlign(generator=torch.Generator().manual_seed(seed)))
    ours = torch.autograd.grad(_objective(out, weight), params)
    scheduler, y = _scheduler(), x.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            y = scheduler.step(_call(model, y, t), t, y).prev_sample
    generator = torch.Generator().manual_seed(seed)
    t_index = randint(0, N - 1, generator)
    eps = torch.randn(y.shape, generator=generator, dtype=torch.float32).double()
    steps = scheduler.timesteps
    abar = scheduler.alphas_cumprod[steps[t_index]].double()
    abar_next = (scheduler.alphas_cumprod[steps[t_index + 1]] if t_index + 1 < N
                 else scheduler.final_alpha_cumprod).double()
    x_t = abar.sqrt() * y + (1 - abar).sqrt() * eps
    x_next = scheduler.step(_call(model, x_t, steps[t_index]), steps[t_index], x_t).prev_sample
    x0_hat = (x_next - (1 - abar_next).sqrt() * eps) / abar_next.sqrt()
    reference = torch.autograd.grad(_objective(x0_hat, weight), params)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, **_tol(reference))
    assert sum(g.abs().sum() for g in ours) > 0
    draws = {next(iter(DirectAlign(generator=torch.Generator().manual_seed(s)).select(range(10)))) for s in range(200)}
    assert draws == set(range(10))  # any step, the first (pure noise) included
    late = {next(iter(DirectAlign(0.5, generator=torch.Generator().manual_seed(s)).select(range(10))))
            for s in range(200)}
    assert late == set(range(5, 10))
    with pytest.raises(sdo.UsageError, match="need 0 <= low < high <= 1"):
        DirectAlign(0.5, 0.5)


def test_direct_align_on_a_flow_chain_recovers_with_the_flow_levels():
    """On flow matching (x_t = (1 - s) x0 + s eps): one Euler step from the noised sample, then x0_hat =
    (x_{t+1} - s_{t+1} eps) / (1 - s_{t+1}), by hand."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, _, x, weight = _setup()
    chain = sdo.Chain.from_diffusers(model, FlowMatchEulerDiscreteScheduler(), N)
    params = list(model.parameters())
    ours = torch.autograd.grad(_objective(sdo.sample(chain, x, strategy=DirectAlign(
        generator=torch.Generator().manual_seed(3))), weight), params)
    with torch.no_grad():
        y = sdo.sample(chain, x)
    generator = torch.Generator().manual_seed(3)
    t = randint(0, N - 1, generator)
    eps = torch.randn(y.shape, generator=generator, dtype=torch.float32).double()
    sigmas = chain.solver.sigmas
    x_t = (1 - sigmas[t]) * y + sigmas[t] * eps
    x_next = x_t + (sigmas[t + 1] - sigmas[t]) * _call(model, x_t, chain.solver.timesteps[t])
    x0_hat = (x_next - sigmas[t + 1] * eps) / (1 - sigmas[t + 1])
    reference = torch.autograd.grad(_objective(x0_hat, weight), params)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_drtune_stops_the_input_gradient_and_keeps_k_evenly_spaced_calls():
    """DRTune: every call sees stop_grad(x_i); the calls of k steps N // k apart from a random offset keep their
    graph; the latent's and the weights' gradients equal the loop's. With k = 1 its weight gradient is SDO's at the
    same step (the kept call's input does not depend on the weights)."""
    model, chain, x, weight = _setup()
    params = list(model.parameters())
    xg = x.clone().requires_grad_(True)
    out = sdo.sample(chain, xg, strategy=DRTune(k=3, generator=torch.Generator().manual_seed(5)))
    ours = torch.autograd.grad(_objective(out, weight), [xg, *params])
    offset = randint(0, N // 3 - 1, torch.Generator().manual_seed(5))
    keep = {offset + j * (N // 3) for j in range(3)}
    assert DRTune(k=3, generator=torch.Generator().manual_seed(5)).select(range(N)) == keep
    scheduler, y = _scheduler(), x.clone().requires_grad_(True)
    start = y
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i in keep):
            eps = _call(model, y.detach(), t)
        y = scheduler.step(eps, t, y).prev_sample
    reference = torch.autograd.grad(_objective(y, weight), [start, *params])
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, **_tol(reference))
    assert ours[0].abs().sum() > 0  # the latent's gradient runs along the solver updates' skip path
    one = DRTune(k=1, generator=torch.Generator().manual_seed(6))
    (at,) = DRTune(k=1, generator=torch.Generator().manual_seed(6)).select(range(N))
    drtune = torch.autograd.grad(_objective(sdo.sample(chain, x, strategy=one), weight), params)
    shortcut = torch.autograd.grad(_objective(sdo.sample(chain, x, strategy=sdo.Shortcut(at=at)), weight), params)
    for a, b in zip(drtune, shortcut, strict=True):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("name", ["refl", "draft-lv", "direct-align"])
def test_weights_only_methods_refuse_a_latent_and_stay_out_of_the_latent_benchmark(name):
    from sdo.cli.bench import bench_rows

    _, chain, x, _ = _setup()
    with pytest.raises(sdo.UsageError, match=f"'{name}' gives no gradient to the latent.*sdo.finetune"):
        sdo.sample(chain, x.clone().requires_grad_(True), strategy=name)
    with pytest.raises(sdo.UsageError, match="gives no gradient to the latent"):
        sdo.optimize_latent(chain, x, lambda x0: x0.sum(), strategy=name, iterations=1)
    assert name not in bench_rows() and "drtune" in bench_rows()
    assert name in sdo.finetuning.methods()


@pytest.mark.parametrize("name", ["refl", "draft-lv", "drtune", "direct-align"])
def test_each_method_fine_tunes_the_digits_model_by_name(digits, judge, tmp_path, name):
    """finetune(..., strategy=NAME): two updates move the LoRA (DRaFT-LV scores its two copies of each sample)."""
    import copy

    from sdo.recipes.finetune_tasks import digits_task

    models = copy.copy(digits)
    models.unet = copy.deepcopy(digits.unet)
    cfg = sdo.FinetuneConfig(output=tmp_path / name, strategy=name, steps=8, updates=2, batch_size=2, lr=1e-2,
                             sample_every=0, eval_count=2, eval_scales=(1.0,), guard_every=0, progress=False, cpu=True)
    result = sdo.finetune(digits_task(models=models, judge=judge), cfg)
    assert result.skipped == 0 and all(m["grad_norm"] > 0 for m in result.metrics)


def test_pretrain_loss_is_the_diffusion_training_loss_on_real_data(digits):
    """diffusion_loss: t and eps drawn from the generator, x_t = DDPM's add_noise from the scheduler's config, and
    mean((model(x_t, t) - eps)^2) for the digits' epsilon model, as a hand-written training step computes it."""
    from diffusers import DDPMScheduler

    from sdo.finetuning.pretrain import diffusion_loss

    unet, scheduler = digits.unet, digits.scheduler
    x0 = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([1, 2, 3, 4])
    ours = diffusion_loss(unet, scheduler, x0, {"class_labels": labels}, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (4,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    x_t = DDPMScheduler.from_config(scheduler.config).add_noise(x0, eps, t)
    with torch.no_grad():
        expected = ((unet(x_t, t, class_labels=labels).sample - eps) ** 2).mean()
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-6, atol=1e-7)


def test_finetune_with_refls_pretrain_loss_logs_it_and_trains_on_it(digits, judge, tmp_path):
    """pretrain_weight > 0: each update adds the diffusion loss on the digits' training images, logged as
    pretrain_loss, and the LoRA moves differently than with the reward alone; a task without data refuses it."""
    import copy

    from sdo.finetuning.lora_files import read_lora
    from sdo.recipes.finetune_tasks import digits_task

    def run(weight, folder):
        models = copy.copy(digits)
        models.unet = copy.deepcopy(digits.unet)
        cfg = sdo.FinetuneConfig(output=tmp_path / folder, strategy="refl", steps=8, updates=2, batch_size=2, lr=1e-2,
                                 pretrain_weight=weight, sample_every=0, eval_count=2, eval_scales=(1.0,),
                                 guard_every=0, progress=False, cpu=True)
        task = digits_task(models=models, judge=judge, labels=[3, 5], target=None)
        return sdo.finetune(task, cfg), read_lora(tmp_path / folder / "lora")[0], task

    with_it, lora_with, task = run(1.0, "with")
    without, lora_without, _ = run(0.0, "without")
    assert all(m["pretrain_loss"] > 0 for m in with_it.metrics) and "pretrain_loss" not in without.metrics[0]
    assert any(not torch.equal(lora_with[k], lora_without[k]) for k in lora_with)
    assert with_it.metrics[0]["reward_mean"] == without.metrics[0]["reward_mean"]  # the same first samples
    task.data = None
    with pytest.raises(sdo.UsageError, match="pretrain_weight needs real data"):
        sdo.finetune(task, sdo.FinetuneConfig(output=tmp_path / "no-data", pretrain_weight=1.0, cpu=True))


def test_the_pipeline_comparison_runs_on_the_tiny_pipeline(pipeline_folder, clip, tokenizer, tmp_path):
    """benchmarks/cheap_gradients_pipeline.py (the comparison ready for a GPU) end to end on the tiny Stable Diffusion:
    two methods, one update each, tuned on PickScore and judged by CLIP score (each `sdo finetune --judge`)."""
    import importlib.util
    import json
    from pathlib import Path

    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cheap_gradients_pipeline.py"
    spec = importlib.util.spec_from_file_location("cheap_gradients_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--model", str(pipeline_folder), "--prompts", "a red square|a blue circle", "--reward", "pickscore",
                 "--pickscore", str(tmp_path / "clip"), "--judge", "clip", "--clip", str(tmp_path / "clip"),
                 "--methods", "sdo,refl,shortft", "--budget", "0.001", "--seeds", "1",
                 "--output", str(tmp_path / "out"), "--", "--steps", "2", "--batch-size", "2", "--eval-count", "2",
                 "--eval-scales", "0,1", "--sample-every", "0", "--guard-every", "0", "--cpu"])
    runs = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(runs) == ["refl", "sdo"]  # ShortFT needs --few-step
    for seeds in runs.values():
        evaluation = seeds[0]["summary"]["evaluation"]
        assert all(abs(evaluation[s]["judge_reward"]) <= 100 for s in ("0", "1"))
    table = (tmp_path / "out" / "results.md").read_text()
    assert all(line in table for line in ("sdo ", "refl ", "judge, tuned"))
