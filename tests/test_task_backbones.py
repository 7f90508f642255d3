"""The latent tasks beyond SD + DDIM: a PixArt-alpha pipeline folder (tiny PixArt transformer, T5 encoder, a T5
tokenizer written by the test), the scheduler choice (DPM-Solver++, LCM), an LCM-distilled UNet (guidance embedded
as ``timestep_cond``) and the clear error of editing with a sampler that cannot be inverted. Every model is
tiny, built from config with fixed seeds; nothing is downloaded."""

import json

import pytest
import tiny
import torch

from sdo import backbones
from sdo.recipes import latent_tasks as tasks
from sdo.recipes.runs import task_chain
from sdo.sampling import sample

PROMPT = "a thick seven"


def _image(seed=4):
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def t5_tokenizer():
    return tiny.t5_tokenizer()


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), scaling_factor=0.18215,
    )


@pytest.fixture(scope="module")
def pixart_folder(t5_tokenizer, tmp_path_factory):
    """A saved PixArtAlphaPipeline: a 2-layer PixArt transformer with a learned variance (8 output channels for 4
    latent ones), a 2-layer T5 encoder, the VAE of 8x8 latents for 16x16 images, PixArt's DPM-Solver++."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4, num_attention_heads=2, caption_channels=16,
        in_channels=4, out_channels=8, cross_attention_dim=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    folder = tmp_path_factory.mktemp("pixart")
    PixArtAlphaPipeline(tokenizer=t5_tokenizer, text_encoder=text_encoder, vae=_tiny_vae(), transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lcm_folder(tiny_sd, tokenizer, tmp_path_factory):
    """A saved LatentConsistencyModelPipeline: an LCM-distilled UNet (``time_cond_proj_dim=8``: it takes the
    guidance embedding), SD's tiny VAE and CLIP text encoder, the LCM scheduler."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    _, vae, text_encoder = tiny_sd
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2, time_cond_proj_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    folder = tmp_path_factory.mktemp("lcm")
    LatentConsistencyModelPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=LCMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(folder)
    return folder


def _run(task, pipe, clip, tokenizer, classifier_folder, head, **common):
    """One task with the test's objective inputs."""
    if task == "edit":
        return tasks.edit(pipe, clip, tokenizer, _image(), PROMPT, **common)
    if task == "style":
        return tasks.style(pipe, clip, _image(), PROMPT, **common)
    if task == "aesthetic":
        return tasks.aesthetic(pipe, clip, head, PROMPT, **common)
    classifier = backbones.ImageClassifier.from_folder(classifier_folder)
    return tasks.adversarial(pipe, classifier, PROMPT, target=2, tau=0.5, **common)


def _assert_lowered(out):
    losses = out.optimization.losses
    assert losses[-1] < losses[0], losses
    assert out.before.shape == out.after.shape == (1, 3, 16, 16)
    assert torch.isfinite(out.after).all()


# --- PixArt-alpha ---------------------------------------------------------------------------------------------------

def test_pixart_folder_loads_and_its_chain_is_the_diffusers_pipeline(pixart_folder):
    """The saved folder round-trips (T5 tokenizer included); the task chain conditions the transformer as
    PixArtAlphaPipeline does (T5 states and attention mask, micro-conditions, CFG on the empty prompt): from the
    same latents, both give the same sample."""
    from diffusers import DiffusionPipeline

    pipe = backbones.load_pipeline(pixart_folder)
    assert pipe.name == "PixArtAlphaPipeline" and pipe.image_size == 16
    kwargs = backbones.text_conditioning(pipe, PROMPT, 2.0)
    cond, uncond = kwargs["cond"], kwargs["uncond"]
    assert cond["encoder_hidden_states"].shape == (1, 16, 16)  # min(PixArt-alpha's 120, the tokenizer's 16) tokens
    assert cond["encoder_attention_mask"][0].tolist() == [1] * 12 + [0] * 4  # 11 pieces and </s>, then padding
    assert uncond["encoder_attention_mask"][0].tolist() == [1] + [0] * 15  # the empty prompt: </s> only
    assert cond["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    chain = task_chain(pipe, PROMPT, 4, 2.0, None)
    assert type(chain.solver).__name__ == "DPMSolverPP" and chain.denoiser.guided

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = sample(chain, x)
    reference = DiffusionPipeline.from_pretrained(pixart_folder, local_files_only=True)
    expected = reference(PROMPT, num_inference_steps=4, guidance_scale=2.0, latents=x.clone(), height=16, width=16,
                         max_sequence_length=16, use_resolution_binning=False, output_type="latent").images
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_pixart_micro_conditions_where_the_transformer_uses_them(pixart_folder):
    """PixArt-alpha at 1024 px conditions on (height, width) and the aspect ratio: given in both CFG branches."""
    from dataclasses import replace

    from diffusers import PixArtTransformer2DModel

    pipe = backbones.load_pipeline(pixart_folder)
    # 12 channels: the size and aspect-ratio embeddings take a third of them each
    config = dict(pipe.denoiser.config, use_additional_conditions=True, attention_head_dim=6,
                  cross_attention_dim=12)
    torch.manual_seed(0)
    pipe = replace(pipe, denoiser=PixArtTransformer2DModel.from_config(config).eval().requires_grad_(False))
    kwargs = backbones.text_conditioning(pipe, PROMPT, 2.0)
    for branch in (kwargs["cond"], kwargs["uncond"]):
        micro = branch["added_cond_kwargs"]
        assert micro["resolution"].tolist() == [[16.0, 16.0]] and micro["aspect_ratio"].tolist() == [[1.0]]
    chain = task_chain(pipe, PROMPT, 4, 2.0, None)
    with torch.no_grad():
        x0 = sample(chain, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert x0.shape == (2, 4, 8, 8) and torch.isfinite(x0).all()


@pytest.mark.parametrize("task", ["style", "aesthetic", "adversarial", "edit"])
def test_tasks_on_a_pixart_folder_lower_their_loss(pixart_folder, clip, tokenizer, classifier_folder, head, task):
    """Every task on PixArt-alpha with classifier-free guidance; PixArt's own DPM-Solver++ samples, except for the
    edit, whose inversion needs DDIM."""
    pipe = backbones.load_pipeline(pixart_folder)
    scheduler = "ddim" if task == "edit" else None
    out = _run(task, pipe, clip, tokenizer, classifier_folder, head, steps=6, iterations=3, lr=0.1,
               guidance_scale=2.0, scheduler=scheduler, progress=False)
    _assert_lowered(out)
    assert out.metrics["solver"] == ("DDIMSolver" if task == "edit" else "DPMSolverPP")


# --- scheduler choice on Stable Diffusion ---------------------------------------------------------------------------

@pytest.mark.parametrize("task, scheduler", [("style", "dpm-solver++"), ("aesthetic", "lcm"), ("adversarial", "lcm")])
def test_tasks_with_a_chosen_scheduler_lower_their_loss(pipeline_folder, clip, tokenizer, classifier_folder, head,
                                                        task, scheduler):
    """SD's PNDM folder sampled with DPM-Solver++ or LCM (stochastic: the same seeded noise in every iteration and
    in the 'before' sample), under CFG; two runs give the same losses."""
    pipe = backbones.load_pipeline(pipeline_folder)
    common = {"steps": 6, "iterations": 3, "lr": 0.1, "guidance_scale": 2.0, "scheduler": scheduler, "progress": False}
    out = _run(task, pipe, clip, tokenizer, classifier_folder, head, **common)
    _assert_lowered(out)
    assert out.metrics["solver"] == {"dpm-solver++": "DPMSolverPP", "lcm": "LCMSolver"}[scheduler]
    again = _run(task, pipe, clip, tokenizer, classifier_folder, head, **common)
    assert again.optimization.losses == out.optimization.losses


def test_task_scheduler_builds_from_the_pipeline_config(pipeline_folder):
    pipe = backbones.load_pipeline(pipeline_folder)
    assert type(backbones.task_scheduler(pipe.scheduler)).__name__ == "DDIMScheduler"  # PNDM is not supported
    for name, cls in [("ddim", "DDIMScheduler"), ("dpm-solver++", "DPMSolverMultistepScheduler"),
                      ("lcm", "LCMScheduler"), ("euler", "EulerDiscreteScheduler")]:
        built = backbones.task_scheduler(pipe.scheduler, name)
        assert type(built).__name__ == cls
        assert built.config.beta_schedule == pipe.scheduler.config.beta_schedule
    with pytest.raises(ValueError, match="unknown scheduler 'pndm'"):
        backbones.task_scheduler(pipe.scheduler, "pndm")


@pytest.mark.parametrize("scheduler, reason", [("lcm", "adds noise"), ("dpm-solver++", "cannot be inverted")])
def test_edit_refuses_a_scheduler_it_cannot_invert(pipeline_folder, clip, tokenizer, scheduler, reason):
    pipe = backbones.load_pipeline(pipeline_folder)
    with pytest.raises(ValueError, match=reason) as err:
        tasks.edit(pipe, clip, tokenizer, _image(), PROMPT, steps=6, iterations=1, scheduler=scheduler, progress=False)
    assert "scheduler='ddim'" in str(err.value) and "--scheduler ddim" in str(err.value)


# --- an LCM-distilled UNet ------------------------------------------------------------------------------------------

def test_guidance_scale_embedding_is_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.5, 7.5])
    for dim in (8, 9, 256):
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(backbones.guidance_scale_embedding(w, dim), expected)


def test_lcm_distilled_unet_embeds_guidance_instead_of_running_it(lcm_folder, clip, tokenizer):
    """``timestep_cond`` (the embedding of guidance_scale - 1) reaches every UNet call, the batch is never doubled
    for CFG, a different guidance scale gives a different sample, and the chain is LatentConsistencyModelPipeline's
    (same latents and noise seed, same sample)."""
    from diffusers import DiffusionPipeline

    pipe = backbones.load_pipeline(lcm_folder)
    calls = []
    hook = pipe.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].shape[0], kwargs.get("timestep_cond"))), with_kwargs=True)
    try:
        out = tasks.style(pipe, clip, _image(), PROMPT, steps=4, iterations=3, lr=0.1, guidance_scale=4.0,
                          progress=False)
        assert calls and all(batch == 1 and cond is not None for batch, cond in calls)
        expected = backbones.guidance_scale_embedding(torch.tensor([3.0]), 8)
        torch.testing.assert_close(calls[0][1], expected)
        other = tasks.style(pipe, clip, _image(), PROMPT, steps=4, iterations=1, guidance_scale=1.5, progress=False)
    finally:
        hook.remove()
    _assert_lowered(out)
    assert out.metrics["solver"] == "LCMSolver"
    assert not torch.allclose(out.before, other.before, atol=1e-4)

    chain = task_chain(pipe, PROMPT, 4, 4.0, None)
    assert not chain.denoiser.guided
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = sample(chain, x, generator=torch.Generator().manual_seed(5))
    reference = DiffusionPipeline.from_pretrained(lcm_folder, local_files_only=True)
    expected = reference(PROMPT, num_inference_steps=4, guidance_scale=4.0, latents=x.clone(), height=16, width=16,
                         generator=torch.Generator().manual_seed(5), output_type="latent").images
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


# --- the command line -----------------------------------------------------------------------------------------------

def test_scheduler_option_of_the_task_commands(pipeline_folder, pixart_folder, clip, tokenizer, tmp_path, capsys):
    from PIL import Image

    from sdo.cli import app as cli
    from sdo.cli import options

    assert options.TASK_SCHEDULERS == backbones.SCHEDULERS
    clip_folder = tmp_path / "clip"
    clip.save_pretrained(clip_folder)
    tokenizer.save_pretrained(clip_folder)
    image = tmp_path / "image.png"
    Image.fromarray((_image()[0].permute(1, 2, 0) * 127.5 + 127.5).byte().numpy()).save(image)
    out = tmp_path / "out"
    argv = ["style", PROMPT, "--model", str(pixart_folder), "--clip", str(clip_folder), "--reference", str(image),
            "--steps", "4", "--iterations", "2", "--lr", "0.1", "--scheduler", "lcm", "--guidance-scale", "2",
            "--output", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["solver"] == "LCMSolver" and len(metrics["losses"]) == 2
    assert (out / "before_after.png").is_file() and (out / "loss.png").is_file()

    edit = ["edit", PROMPT, "--model", str(pipeline_folder), "--clip", str(clip_folder), "--image", str(image),
            "--steps", "4", "--iterations", "1", "--output", str(tmp_path / "edit"), "--no-progress"]
    capsys.readouterr()
    assert cli.main(edit + ["--scheduler", "lcm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after diffusers' loading bars
    assert err.startswith("sdo edit: error:") and "adds noise" in err and "--scheduler ddim" in err
    with pytest.raises(SystemExit):
        cli.main(edit + ["--scheduler", "pndm"])
    assert "invalid choice: 'pndm'" in capsys.readouterr().err
