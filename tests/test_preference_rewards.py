"""The preference rewards of issue #20 (CLIP score, PickScore, the LAION aesthetic predictor v2) on a tiny CLIP built
from config: preprocessing equal to the image processor's own output, values equal to a hand computation through
transformers, gradients finite and non-zero, ``--reward NAME[:weight],...`` parsed and loaded from folders."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdo
from sdo.backbones import load_clip_reward_parts, load_reward
from sdo.objectives.clip import ClipPreprocess
from sdo.objectives.preference import CLIPScore, LaionAesthetic, PickScore
from sdo.objectives.rewards import digits_reward_terms, parse_rewards


@pytest.fixture
def clip_folder(clip, tokenizer, tmp_path):
    """The tiny CLIP saved as a reward model's folder is: model, tokenizer and a CLIP image processor
    (shorter side to 16, center crop 16)."""
    from transformers import AutoImageProcessor

    folder = tmp_path / "clip"
    clip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        '{"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 16}, '
        '"crop_size": {"height": 16, "width": 16}, "do_resize": true, "do_center_crop": true, "resample": 3}')
    AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)  # readable offline
    return folder


def _image(height, width, seed=0):
    """A random smooth 8-bit RGB image (a 5x5 field of random colours, bilinearly enlarged, plus 8-bit grain) as the
    processor gets it (PIL) and as a reward gets it (a tensor in [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    field = torch.nn.functional.interpolate(torch.rand(1, 3, 5, 5, generator=g), size=(height, width), mode="bilinear")
    grain = torch.randint(-8, 9, (1, 3, height, width), generator=g)
    pixels = (field * 230 + 12 + grain).round().clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)
    tensor = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    return Image.fromarray(pixels), tensor


def _processor(folder):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)


@pytest.mark.parametrize(("height", "width"), [(16, 16), (20, 28), (40, 56), (33, 17)])
def test_preprocessing_equals_the_image_processors_output(clip_folder, height, width):
    """ClipPreprocess.from_processor on the tensor equals the processor's pixel values of the same 8-bit image: to
    float round-off without a resize; with one (up or down, either orientation), to PIL's fixed-point arithmetic
    and the 8-bit rounding of its two passes: under 1.5 levels of 255 per pixel, under half a level on average."""
    processor = _processor(clip_folder)
    pil, tensor = _image(height, width)
    expected = torch.as_tensor(np.asarray(processor(images=pil, return_tensors="np")["pixel_values"]))
    ours = ClipPreprocess.from_processor(processor)(tensor)
    assert ours.shape == expected.shape == (1, 3, 16, 16)
    error = (ours - expected).abs()
    if (height, width) == (16, 16):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    else:
        level = 1 / 255 / min(processor.image_std)  # one 8-bit level, in normalized units
        assert error.max() < 1.5 * level and error.mean() < 0.5 * level, (error.max() / level, error.mean() / level)
    x = tensor.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ClipPreprocess.from_processor(processor)(x).square().sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_processor_that_is_not_clips_is_refused(clip_folder):
    processor = _processor(clip_folder)
    processor.resample = 2  # bilinear
    with pytest.raises(sdo.UsageError, match=r"got size=.*16.*resample=2"):
        ClipPreprocess.from_processor(processor)


def _reference_cosine(model, tokenizer, processor, pil, prompt):
    """cos(E_img, E_txt) as transformers computes it from the processor's (non-differentiable) pixel values."""
    pixels = torch.as_tensor(np.asarray(processor(images=pil, return_tensors="np")["pixel_values"]))
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(**tokenizer([prompt], padding=True, return_tensors="pt"))
    image, text = (getattr(o, "pooler_output", o) for o in (image, text))
    return torch.nn.functional.cosine_similarity(image, text).item()


@pytest.mark.parametrize("kind", ["clip", "pickscore"])
def test_clip_score_and_pickscore_equal_transformers_and_have_a_gradient(clip_folder, kind):
    """CLIP score = 100 cos, PickScore = exp(logit_scale) cos, on 20x28 images, against transformers on the
    processor's pixel values (within what the 8-bit rounding of the resize moves a tiny CLIP); one prompt per
    image; the image gradient is finite and non-zero."""
    model, tokenizer, preprocess = load_clip_reward_parts(clip_folder)
    reward = (CLIPScore if kind == "clip" else PickScore)(model, tokenizer, preprocess)
    scale = 100.0 if kind == "clip" else model.logit_scale.exp().item()
    prompts = ["a thick seven", "a cat"]
    images = [_image(20, 28, seed) for seed in (1, 2)]
    x = torch.cat([t for _, t in images]).requires_grad_(True)
    values = reward(x, prompts)
    expected = [scale * _reference_cosine(model, tokenizer, _processor(clip_folder), pil, p)
                for (pil, _), p in zip(images, prompts, strict=True)]
    torch.testing.assert_close(values.detach(), torch.tensor(expected), rtol=0, atol=0.01 * scale)
    (grad,) = torch.autograd.grad(values.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert len(reward._texts) == 2
    torch.testing.assert_close(reward(x.detach(), "a cat")[1], values[1].detach())  # one prompt for every image
    with pytest.raises(sdo.UsageError, match="3 prompts for 2 images"):
        reward(x, ["a", "b", "c"])


def test_laion_v2_head_reads_its_layers_in_order(clip_folder, tmp_path):
    """The LAION v2 MLP's file (layers.0, .2, .4, .6, .7: Linear layers with dropouts between, inactive) is read in
    layer order, and the reward is that MLP on the normalized image embedding, clipped to [1, 10]."""
    model, _, preprocess = load_clip_reward_parts(clip_folder)
    g = torch.Generator().manual_seed(0)
    sizes = [(16, 8), (8, 16), (4, 8), (2, 4), (1, 2)]
    state = {}
    for key, (out_features, in_features) in zip(("0", "2", "4", "6", "7"), sizes, strict=True):
        state[f"layers.{key}.weight"] = torch.randn(out_features, in_features, generator=g)
        state[f"layers.{key}.bias"] = torch.randn(out_features, generator=g)
    state["layers.7.bias"] = torch.tensor([5.0])
    save_file(state, str(tmp_path / "v2.safetensors"))
    reward = LaionAesthetic(model, sdo.objectives.clip.AestheticScore.load_head(tmp_path / "v2.safetensors"),
                            preprocess)
    x = torch.cat([_image(20, 28, s)[1] for s in (3, 4)]).requires_grad_(True)
    value = reward(x, ["ignored", "ignored"])
    with torch.no_grad():
        out = model.get_image_features(pixel_values=preprocess(x))
        h = torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)
        for key in ("0", "2", "4", "6", "7"):
            h = h @ state[f"layers.{key}.weight"].T + state[f"layers.{key}.bias"]
    torch.testing.assert_close(value.detach(), h.squeeze(-1).clamp(1, 10), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_load_reward_sums_weighted_rewards_from_folders(clip_folder, head):
    """'clip:2,pickscore:0.5,aesthetic:-1' loads each model once and sums the weighted rewards."""
    reward = load_reward("clip:2,pickscore:0.5,aesthetic:-1", clip=clip_folder, pickscore=clip_folder, head=head)
    x = _image(16, 16, 5)[1]
    parts = load_clip_reward_parts(clip_folder)
    expected = (2 * CLIPScore(*parts)(x, "a cat") + 0.5 * PickScore(*parts)(x, "a cat")
                - LaionAesthetic(parts[0], sdo.objectives.clip.AestheticScore.load_head(head), parts[2])(x))
    torch.testing.assert_close(reward(x, ["a cat"]), expected)


def test_a_folder_named_twice_is_read_once(clip_folder):
    """A CLIP folder given as both --clip and --pickscore, or named by a reward and its judge (one `models` dict), is
    read once and its model shared; a fresh dict reads it again."""
    reward = load_reward("clip,pickscore", clip=clip_folder, pickscore=clip_folder)
    assert reward.terms[0][0].model is reward.terms[1][0].model
    models = {}
    tuned = load_reward("pickscore", pickscore=clip_folder, models=models)
    judge = load_reward("clip", clip=clip_folder, models=models)
    assert len(models) == 1 and judge.terms[0][0].model is tuned.terms[0][0].model
    assert load_reward("clip", clip=clip_folder).terms[0][0].model is not tuned.terms[0][0].model


def test_reward_specs():
    assert parse_rewards("pickscore:1, clip:0.5,aesthetic", ("clip", "pickscore", "aesthetic")) == [
        ("pickscore", 1.0), ("clip", 0.5), ("aesthetic", 1.0)]
    assert digits_reward_terms("class+ink", 0.3) == [("class", 1.0), ("ink", 0.3)]
    for spec, message in (("bogus", "unknown reward 'bogus'"), ("class:x", "'x' of 'class' is not a finite"),
                          ("ink:nan", "is not a finite"), ("class,class:2", "'class' appears twice"),
                          ("", "unknown reward ''")):
        with pytest.raises(sdo.UsageError, match=message):
            digits_reward_terms(spec)


@pytest.mark.parametrize(("name", "package"), [("hpsv2", "hpsv2"), ("imagereward", "image-reward")])
def test_packaged_rewards_say_why_not(name, package):
    with pytest.raises(sdo.UsageError, match=f"{package} is not installed.*replaces the CPU torch build"):
        load_reward(name)
