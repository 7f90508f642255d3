"""SDXL, SD3 and FLUX.1 pipeline folders (tiny components built from config with fixed seeds, tokenizers written by
the test: tests/tiny.py): the sdo chain equals each diffusers pipeline's own sample, SDO's gradient equals a
hand-written loop over the pipeline's scheduler and denoiser, every latent task lowers its loss, and a fine-tuned
LoRA loads into the pipeline with its own ``load_lora_weights``."""

import dataclasses

import pytest
import tiny
import torch
from test_task_backbones import PROMPT, _run

import sdo
from sdo import backbones
from sdo.backbones.families import flow_schedule
from sdo.recipes.runs import task_chain
from sdo.sampling import sample

BUILDERS = {"sdxl": tiny.save_sdxl, "sd3": tiny.save_sd3, "flux": tiny.save_flux}
GUIDANCE = {"sdxl": 2.0, "sd3": 2.0, "flux": 3.5}  # FLUX.1-dev: the guidance scale is the transformer's input
STEPS = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in BUILDERS.items()}


def _pack(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)


def _unpack(x, c, h, w):
    return x.reshape(x.shape[0], h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(x.shape[0], c, h, w)


def _latent(pipe, seed=0, dtype=torch.float32):
    side = pipe.image_size // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return torch.randn(1, pipe.denoiser.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed),
                       dtype=dtype)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_chain_is_the_diffusers_pipeline(folders, name, guided):
    """From the same latents, sdo's no-grad sample equals the pipeline's ``output_type="latent"`` output: SDXL's
    two towers, pooled embedding and time ids; SD3's three encoders and shifted flow schedule; FLUX's packed
    sequence, ids, guidance input and size-dependent shift (its output unpacked)."""
    from diffusers import DiffusionPipeline

    pipe = backbones.load_pipeline(folders[name])
    scale = GUIDANCE[name] if guided else 1.0
    chain = task_chain(pipe, PROMPT, 4, scale, None)
    assert chain.denoiser.guided == (guided and name != "flux")  # FLUX-dev embeds its guidance, runs no CFG
    x = _latent(pipe)
    with torch.no_grad():
        ours = sample(chain, x * chain.init_noise_sigma)
    reference = DiffusionPipeline.from_pretrained(folders[name], local_files_only=True)
    assert type(reference).__name__ == pipe.name
    size = pipe.image_size
    expected = reference(PROMPT, num_inference_steps=4, guidance_scale=scale, height=size, width=size,
                         latents=_pack(x) if name == "flux" else x.clone(), output_type="latent").images
    if name == "flux":
        expected = _unpack(expected, *x.shape[1:])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    if name == "sdxl":
        cond = backbones.text_conditioning(pipe, PROMPT, scale)["cond"]
        assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[size, size, 0, 0, size, size]]


def _reference_loop(name, pipe, source, x, keep: int):
    """The pipeline's own scheduler and denoiser in a hand-written loop (Fig. 4 of the SDO paper): a fresh,
    stateful scheduler, only the call ``keep`` under grad, classifier-free guidance written out, FLUX's packing
    done here."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS, **flow_schedule(pipe, STEPS))
    kwargs = backbones.text_conditioning(pipe, PROMPT, GUIDANCE[name])
    cond, uncond = kwargs["cond"], kwargs.get("uncond")
    model = source.transformer if name == "flux" else pipe.denoiser
    if name == "flux":
        c, h, w = x.shape[1:]
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h // 2.0), torch.arange(w // 2.0),
                                         indexing="ij"), -1).reshape(-1, 3).double()
        x = _pack(x)
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i == keep):
            if name == "flux":
                out = model(hidden_states=x, timestep=t.expand(1).double() / 1000, guidance=cond["guidance"],
                            pooled_projections=cond["pooled_projections"],
                            encoder_hidden_states=cond["encoder_hidden_states"], img_ids=ids,
                            txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3).double()).sample
            else:
                both = {k: (torch.cat([uncond[k], cond[k]]) if torch.is_tensor(cond[k]) else
                            {j: torch.cat([uncond[k][j], cond[k][j]]) for j in cond[k]}) for k in cond}
                model_in = torch.cat([x, x])
                model_in = scheduler.scale_model_input(model_in, t) if name == "sdxl" else model_in
                u, c_ = model(model_in, timestep=t.expand(2), **both).sample.chunk(2)
                out = u + GUIDANCE[name] * (c_ - u)
        x = scheduler.step(out, t, x).prev_sample
    return _unpack(x, c, h, w) if name == "flux" else x


@pytest.mark.parametrize("name", list(BUILDERS))
def test_sdo_gradient_equals_a_hand_written_loop_over_the_pipeline(folders, name):
    """In float64, SDO keeping the graph of step 1 gives the latent and weight gradients of the pipeline's own
    scheduler and denoiser run by hand with only that call under ``set_grad_enabled`` (and not those of step 2)."""
    from diffusers import DiffusionPipeline

    pipe = backbones.load_pipeline(folders[name], dtype=torch.float64)
    source = DiffusionPipeline.from_pretrained(folders[name], local_files_only=True, torch_dtype=torch.float64)
    chain = task_chain(pipe, PROMPT, STEPS, GUIDANCE[name], None)
    weight = torch.randn(_latent(pipe).shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params = [p for p in pipe.denoiser.parameters()][-3:]  # the output layers: their gradient exists at any step
    for p in params:
        p.requires_grad_(True)

    def grads(run):
        x = (_latent(pipe, dtype=torch.float64) * chain.init_noise_sigma).requires_grad_(True)
        return torch.autograd.grad((run(x) * weight).sum(), [x, *params])

    ours = grads(lambda x: sample(chain, x, strategy=sdo.Shortcut(at=1)))
    if name == "flux":
        source.transformer = pipe.denoiser.transformer  # the same weights (with requires_grad set) by hand
    reference = grads(lambda x: _reference_loop(name, pipe, source, x, keep=1))
    for a, b in zip(ours, reference, strict=True):  # the schedulers' steps compute in float32 inside
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * b.abs().max().item())
    assert all(g.abs().sum() > 0 for g in ours)
    other = grads(lambda x: _reference_loop(name, pipe, source, x, keep=2))
    assert not torch.allclose(ours[0], other[0], rtol=1e-3)


@pytest.mark.parametrize("task", ["style", "aesthetic", "adversarial", "edit"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_latent_tasks_lower_their_loss(folders, clip, tokenizer, classifier_folder, head, name, task):
    """Every latent task on every family, with its guidance; the edit inverts with DDIM on SDXL (its Euler
    scheduler re-scales the input) and with the flow Euler scheduler on SD3 and FLUX."""
    pipe = backbones.load_pipeline(folders[name])
    if name == "flux":  # FLUX's default 128 latent rows: 256 px with this VAE; 16 px keeps the test fast
        pipe = dataclasses.replace(pipe, image_size=16)
    scheduler = "ddim" if task == "edit" and name == "sdxl" else None
    out = _run(task, pipe, clip, tokenizer, classifier_folder, head, steps=4, iterations=3, lr=0.1,
               guidance_scale=GUIDANCE[name], scheduler=scheduler, progress=False)
    losses = out.optimization.losses
    assert losses[-1] < losses[0], losses
    assert out.before.shape == out.after.shape == (1, 3, pipe.image_size, pipe.image_size)
    assert torch.isfinite(out.after).all()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_finetune_command_on_each_family_and_the_pipeline_loads_its_lora(folders, clip, tokenizer, tmp_path, name):
    """`sdo finetune --model FOLDER` runs end to end; the pipeline's own ``load_lora_weights`` reads the LoRA (keys
    under ``unet.`` or ``transformer.``) and its denoiser then gives the tuned output, not the base's."""
    from diffusers import DiffusionPipeline

    from sdo.cli import main

    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(folders[name]), "--clip", str(tmp_path / "clip"), "--prompts",
                 "a red square|a blue circle", "--steps", "2", "--updates", "2", "--batch-size", "1", "--lr", "0.05",
                 "--guidance-scale", str(GUIDANCE[name]), "--sample-every", "0", "--eval-count", "1",
                 "--sample-count", "1", "--guard-every", "0", "--output", str(out), "--no-progress"])
    assert code == 0 and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    source = DiffusionPipeline.from_pretrained(folders[name], local_files_only=True)
    model = source.transformer if name == "flux" else getattr(source, "unet", None) or source.transformer
    pipe = backbones.load_pipeline(folders[name])
    cond = backbones.text_conditioning(pipe, "a red square", GUIDANCE[name])["cond"]
    x = _latent(pipe)
    denoiser = backbones.families.family_denoiser(pipe.name, model)
    with torch.no_grad():
        base = denoiser(x, timestep=torch.tensor([500.0]), **cond)
        source.load_lora_weights(out / "lora", adapter_name="tuned")
        tuned = denoiser(x, timestep=torch.tensor([500.0]), **cond)
    base, tuned = (getattr(o, "sample", o) for o in (base, tuned))
    assert (tuned - base).abs().max() > 1e-6


@pytest.mark.parametrize("name", list(BUILDERS))
def test_bench_builds_each_family_from_its_config(folders, tmp_path, name):
    """`sdo bench --model CONFIG` (the GPU cost script's path: benchmarks/gpu_families.sh) on the tiny configs: the
    family's latent and conditioning shapes, a LoRA's gradient in the weight rows, the blocks' own checkpointing."""
    import json

    from sdo.cli import main

    sub = "unet" if name == "sdxl" else "transformer"
    config = json.loads((folders[name] / sub / "config.json").read_text())
    if name == "flux":  # FLUX's own config has no sample size (1024 px by default): 8 latent rows here
        config["sample_size"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tmp_path / "config.json"), "--quick", "--strategies", "sdo,truncated",
                 "--lora", "2", "--block-checkpointing", "--no-fidelity", "--sweep", "none", "--guidance-scales",
                 "none", "--quality-iterations", "0", "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "bench.json").read_text())
    assert results["meta"]["latent_shape"] == [2, 4 if name == "sdxl" else 16, 8, 8]
    assert "LoRA rank 2" in results["meta"]["model"] and "checkpointing inside its blocks" in results["meta"]["model"]
    for row in ("sdo", "sdo+params", "truncated+params"):
        assert results["main"][row]["forward"] == 5 and results["main"][row]["backward"] == 1
    assert "fidelity" not in results and "depth" not in results


def test_the_committed_real_size_configs_build_the_models_of_the_docs():
    """benchmarks/configs: every key a constructor argument, and the parameter counts docs/tasks.md states (SDXL's
    UNet 2.567 B, SD3.5-medium's transformer 2.243 B, FLUX.1-dev's 11.901 B), built on the meta device."""
    import json
    from pathlib import Path

    import diffusers
    from accelerate import init_empty_weights

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
    for file, billions in (("sdxl_unet", 2.567), ("sd35_medium_transformer", 2.243), ("flux1_dev_transformer", 11.901)):
        config = json.loads((folder / f"{file}.json").read_text())
        cls = getattr(diffusers, config.pop("_class_name"))
        assert cls.extract_init_dict(config)[1] == {}
        with init_empty_weights():
            model = cls.from_config(config)
        assert round(sum(p.numel() for p in model.parameters()) / 1e9, 3) == billions
    with pytest.raises(sdo.UsageError, match="config class 'PixArtTransformer2DModel' is not one sdo builds"):
        backbones.families.random_backbone({"_class_name": "PixArtTransformer2DModel"})


def test_block_checkpointing_gives_the_same_lora_with_the_blocks_recomputed(folders, clip, tokenizer, tmp_path):
    """FinetuneConfig(block_checkpointing=True) turns on the denoiser's own checkpointing (SDXL's UNet here): the
    same LoRA after two updates as without it."""
    from sdo.finetuning import FinetuneConfig, finetune
    from sdo.finetuning.lora_files import read_lora
    from sdo.objectives.clip import CLIPTextSimilarity
    from sdo.recipes.finetune_tasks import pipeline_task

    def reward(images, prompts):
        return 1 - CLIPTextSimilarity(clip, list(prompts), tokenizer)(images)

    loras = []
    for blocks in (False, True):
        pipe = backbones.load_pipeline(folders["sdxl"])
        task = pipeline_task(pipe, ["a red square", "a blue circle"], reward, guidance_scale=2.0)
        cfg = FinetuneConfig(output=tmp_path / str(blocks), updates=2, steps=2, batch_size=2, lr=0.05,
                             guidance_scale=2.0, block_checkpointing=blocks, sample_every=0, eval_count=1,
                             sample_count=1, eval_scales=(1.0,), guard_every=0, progress=False, cpu=True)
        finetune(task, cfg)
        assert pipe.denoiser.is_gradient_checkpointing == blocks
        loras.append(read_lora(tmp_path / str(blocks) / "lora")[0])
    assert loras[0].keys() == loras[1].keys()
    for key, value in loras[0].items():
        torch.testing.assert_close(loras[1][key], value, rtol=1e-5, atol=1e-7)
    assert any(v.abs().max() > 0 for k, v in loras[0].items() if "lora_B" in k)  # the LoRA did move


@pytest.mark.parametrize("name", list(BUILDERS))
def test_shortft_command_on_each_family(folders, clip, tokenizer, tmp_path, name):
    """`sdo shortft --model FOLDER --few-step FOLDER/<denoiser>` (here the pipeline's own denoiser stands in for a
    distilled one): progressive stages over per-segment LoRAs on SDXL's Euler chain and SD3's and FLUX's flow Euler
    chains, each segment's LoRA filed under the pipeline's component."""
    import json

    from sdo.cli import main
    from sdo.finetuning.lora_files import lora_file_prefix

    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    sub = "unet" if name == "sdxl" else "transformer"
    out = tmp_path / "run"
    code = main(["shortft", "--model", str(folders[name]), "--few-step", str(folders[name] / sub), "--clip",
                 str(tmp_path / "clip"), "--prompts", "a red square|a blue circle", "--steps", "4", "--segments", "2",
                 "--updates", "2", "--batch-size", "1", "--lr", "0.05", "--guidance-scale", str(GUIDANCE[name]),
                 "--sample-every", "0", "--eval-count", "1", "--sample-count", "1", "--guard-every", "0",
                 "--output", str(out), "--no-progress"])
    assert code == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == [1, 2] and all(m["grad_norm"] > 0 for m in metrics)
    for segment in ("segment_1", "segment_2"):
        assert lora_file_prefix(out / "lora" / segment) == sub


def test_flux_true_cfg_is_the_pipelines_and_only_flux_takes_it(folders):
    """load_pipeline(..., true_cfg_scale=2): FLUX runs FluxPipeline's true classifier-free guidance on the empty
    prompt beside dev's guidance input (the same sample as the pipeline with negative_prompt="" and that scale);
    another family, or fine-tuning, refuses it by name."""
    from diffusers import DiffusionPipeline

    from sdo.recipes.finetune_tasks import pipeline_task

    pipe = backbones.load_pipeline(folders["flux"], true_cfg_scale=2.0)
    chain = task_chain(pipe, PROMPT, STEPS, GUIDANCE["flux"], None)
    assert chain.denoiser.guided and chain.denoiser.guidance_scale == 2.0
    x = _latent(pipe)
    with torch.no_grad():
        ours = sample(chain, x)
    reference = DiffusionPipeline.from_pretrained(folders["flux"], local_files_only=True)
    size = pipe.image_size
    expected = reference(PROMPT, negative_prompt="", true_cfg_scale=2.0, num_inference_steps=STEPS,
                         guidance_scale=GUIDANCE["flux"], height=size, width=size, latents=_pack(x),
                         output_type="latent").images
    torch.testing.assert_close(ours, _unpack(expected, *x.shape[1:]), rtol=1e-4, atol=1e-5)
    with pytest.raises(sdo.UsageError, match="true_cfg_scale is FLUX's"):
        backbones.load_pipeline(folders["sdxl"], true_cfg_scale=2.0)
    with pytest.raises(sdo.UsageError, match="true_cfg_scale is for the latent tasks"):
        pipeline_task(pipe, ["a red square"], lambda images, prompts: images.mean((1, 2, 3)))


def test_vae_slicing_decodes_one_image_at_a_time_with_the_same_values_and_gradient(folders):
    """VAEDecoder(slicing=True, checkpoint=True): each image decoded under its own checkpoint; the images and the
    latents' gradient equal the batched decode's (float64)."""
    pipe = backbones.load_pipeline(folders["sd3"], dtype=torch.float64)
    latents = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        outs = []
        for decoder in (backbones.VAEDecoder(pipe.vae), backbones.VAEDecoder(pipe.vae, checkpoint=True, slicing=True)):
            x = latents.clone().requires_grad_(True)
            images = decoder(x)
            outs.append((images.detach(), torch.autograd.grad((images * weight).sum(), x)[0]))
    finally:
        hook.remove()
    assert calls == [3, 1, 1, 1, 1, 1, 1]  # batched; then per image, and per image again in backward
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scheduler", ["dpm-solver++", "ddim"])
def test_sdxl_with_another_scheduler_is_the_pipeline_with_it(folders, scheduler):
    """--scheduler on SDXL: the DPM-Solver++ or DDIM scheduler built from SDXL's config (leading spacing, offset 1)
    samples as the pipeline does with that scheduler."""
    from diffusers import DiffusionPipeline

    pipe = backbones.load_pipeline(folders["sdxl"])
    chain = task_chain(pipe, PROMPT, STEPS, GUIDANCE["sdxl"], scheduler)
    x = _latent(pipe)
    with torch.no_grad():
        ours = sample(chain, x * chain.init_noise_sigma)
    reference = DiffusionPipeline.from_pretrained(folders["sdxl"], local_files_only=True)
    reference.scheduler = backbones.task_scheduler(reference.scheduler, scheduler)
    expected = reference(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE["sdxl"], height=16, width=16,
                         latents=x.clone(), output_type="latent").images
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_flux_schnell_takes_no_guidance_and_is_its_pipeline(tmp_path):
    """A transformer without ``guidance_embeds`` (FLUX.1-schnell): no guidance input, no CFG, the pipeline's sample."""
    from diffusers import DiffusionPipeline

    folder = tiny.save_flux(tmp_path / "schnell", guidance_embeds=False)
    pipe = backbones.load_pipeline(folder)
    cond = backbones.text_conditioning(pipe, PROMPT, 3.5)
    assert set(cond) == {"cond"} and "guidance" not in cond["cond"]
    chain = task_chain(pipe, PROMPT, STEPS, 3.5, None)
    x = _latent(pipe)
    with torch.no_grad():
        ours = sample(chain, x)
    reference = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    size = pipe.image_size
    expected = reference(PROMPT, num_inference_steps=STEPS, guidance_scale=3.5, height=size, width=size,
                         latents=_pack(x), output_type="latent").images
    torch.testing.assert_close(ours, _unpack(expected, *x.shape[1:]), rtol=1e-4, atol=1e-5)


def test_pretrain_loss_on_a_flow_model_is_rectified_flows(folders):
    """The pre-training loss on SD3's flow transformer: x_t = (1 - s) x0 + s eps at s = t / 1000, the target
    eps - x0, the timestep s * 1000, as a hand-written flow-matching training step computes it."""
    from sdo.finetuning.pretrain import diffusion_loss

    pipe = backbones.load_pipeline(folders["sd3"])
    cond = backbones.text_conditioning(pipe, PROMPT, 1.0)["cond"]
    x0 = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = diffusion_loss(pipe.denoiser, pipe.scheduler, x0, cond, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (2,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    s = (t.float() / 1000).view(-1, 1, 1, 1)
    with torch.no_grad():
        out = pipe.denoiser((1 - s) * x0 + s * eps, timestep=t.float(),
                            **{k: v.expand(2, *v.shape[1:]) for k, v in cond.items()}).sample
    torch.testing.assert_close(ours.detach(), ((out - (eps - x0)) ** 2).mean(), rtol=1e-6, atol=1e-7)


def test_sd3_without_its_t5_is_its_pipeline(folders, tmp_path):
    """load_pipeline(..., drop_t5=True) (``--drop-t5``): SD3 without T5, as its pipeline allows (zeros in T5's place):
    the pipeline's sample loaded the same way, from the full folder and from one saved without T5; another family
    refuses it by name."""
    from diffusers import DiffusionPipeline

    pipe = backbones.load_pipeline(folders["sd3"], drop_t5=True)
    assert pipe.pipeline.text_encoder_3 is None
    pipe.pipeline.save_pretrained(tmp_path / "sd3-no-t5")
    for folder in (folders["sd3"], tmp_path / "sd3-no-t5"):
        pipe = backbones.load_pipeline(folder, drop_t5=True)
        chain = task_chain(pipe, PROMPT, STEPS, GUIDANCE["sd3"], None)
        x = _latent(pipe)
        with torch.no_grad():
            ours = sample(chain, x)
        reference = DiffusionPipeline.from_pretrained(folder, local_files_only=True, text_encoder_3=None,
                                                      tokenizer_3=None)
        expected = reference(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE["sd3"], height=16,
                             width=16, latents=x.clone(), output_type="latent").images
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(sdo.UsageError, match="drop_t5 is SD3's"):
        backbones.load_pipeline(folders["flux"], drop_t5=True)
