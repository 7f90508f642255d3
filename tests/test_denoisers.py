"""Denoiser backbones: tiny diffusers models built from config with a fixed seed (diffusers' own test sizes:
block_out_channels=(4, 8), norm_num_groups=2, layers_per_block=1, sample_size=8, small heads), plain callables,
conditioning, classifier-free guidance, and the errors a latent that does not fit the model raises.

Every comparison is against plain model calls or a hand-written diffusers loop (a fresh scheduler stepped as a
pipeline does), never against sdo itself. Gradients are compared in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

import sdo

F64 = torch.float64
NO_EXTRA = {"resolution": None, "aspect_ratio": None}  # PixArt's added_cond_kwargs without size conditioning


# ---------------------------------------------------------------------------------------------------- models


def tiny_unet2d(num_class_embeds: int | None = 5) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2,
        num_class_embeds=num_class_embeds,
    ).eval()


def tiny_unet2d_condition() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
    ).eval()


DIT_CLASSES = 8  # label DIT_CLASSES is DiT's null class (the extra embedding row used for guidance)


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=8,  # learned sigma
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        patch_size=2,
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=DIT_CLASSES,
    ).eval()


def tiny_pixart() -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=4,
        num_attention_heads=2,
        caption_channels=8,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def fresh(scheduler_cls, n: int, **config):
    scheduler = scheduler_cls(**config)
    scheduler.set_timesteps(n)
    return scheduler


def assert_differs(a: torch.Tensor, b: torch.Tensor, min_gap: float = 1e-3) -> None:
    gap = (a - b).abs().max().item()
    assert gap > min_gap, f"expected the tensors to differ (max gap {gap:.3g})"


# ---------------------------------------------------------------------------------------------------- 1. UNet2DModel


def test_unet2d_class_labels_equal_plain_call():
    model = tiny_unet2d()
    x, t = randn(2, 3, 8, 8, seed=1), torch.tensor(500)
    labels = torch.tensor([0, 3])
    with torch.no_grad():
        out = sdo.Denoiser(model, cond={"class_labels": labels})(x, t)
        assert torch.equal(out, model(x, t, class_labels=labels).sample)
        # the labels reach the model: other labels give another output
        assert_differs(out, model(x, t, class_labels=torch.tensor([1, 4])).sample)
        # a batch-1 label is broadcast to the latent's batch
        one = sdo.Denoiser(model, cond={"class_labels": torch.tensor([3])})(x, t)
        assert torch.equal(one, model(x, t, class_labels=torch.tensor([3, 3])).sample)


def test_unet2d_class_conditional_chain_matches_diffusers_loop():
    model = tiny_unet2d()
    n, x = 3, randn(2, 3, 8, 8, seed=2)
    labels = torch.tensor([1, 2])

    def run(lab):
        chain = sdo.Chain.from_diffusers(model, DDIMScheduler(clip_sample=False), n, cond={"class_labels": lab})
        with torch.no_grad():
            return sdo.sample(chain, x)

    out = run(labels)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    assert_differs(out, run(torch.tensor([4, 0])))

    scheduler, latent = fresh(DDIMScheduler, n, clip_sample=False), x
    with torch.no_grad():
        for t in scheduler.timesteps:
            latent = scheduler.step(model(latent, t, class_labels=labels).sample, t, latent).prev_sample
    torch.testing.assert_close(out, latent, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- 2. UNet2DConditionModel


def test_unet2d_condition_cfg_equals_two_plain_calls():
    model = tiny_unet2d_condition().double()
    x, t, s = randn(2, 4, 8, 8, seed=1, dtype=F64), torch.tensor(700), 4.0
    e, ue = randn(2, 5, 8, seed=2, dtype=F64), randn(2, 5, 8, seed=3, dtype=F64)
    denoiser = sdo.Denoiser(
        model, cond={"encoder_hidden_states": e}, uncond={"encoder_hidden_states": ue}, guidance_scale=s
    )
    with torch.no_grad():
        out = denoiser(x, t)
        c = model(x, t, encoder_hidden_states=e).sample
        u = model(x, t, encoder_hidden_states=ue).sample
    assert out.shape == x.shape
    torch.testing.assert_close(out, u + s * (c - u), rtol=1e-10, atol=1e-12)
    assert_differs(out, c)  # guidance changes the output


def test_unet2d_condition_batch1_embedding_is_broadcast():
    model = tiny_unet2d_condition().double()
    x, t = randn(3, 4, 8, 8, seed=4, dtype=F64), torch.tensor(300)
    e, ue = randn(1, 5, 8, seed=5, dtype=F64), randn(1, 5, 8, seed=6, dtype=F64)
    with torch.no_grad():
        plain = sdo.Denoiser(model, cond={"encoder_hidden_states": e})(x, t)
        repeated = sdo.Denoiser(model, cond={"encoder_hidden_states": e.repeat(3, 1, 1)})(x, t)
        torch.testing.assert_close(plain, repeated, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            plain, model(x, t, encoder_hidden_states=e.repeat(3, 1, 1)).sample, rtol=1e-12, atol=1e-12
        )
        guided = sdo.Denoiser(
            model, cond={"encoder_hidden_states": e}, uncond={"encoder_hidden_states": ue}, guidance_scale=2.5
        )
        guided_rep = sdo.Denoiser(
            model,
            cond={"encoder_hidden_states": e.repeat(3, 1, 1)},
            uncond={"encoder_hidden_states": ue.repeat(3, 1, 1)},
            guidance_scale=2.5,
        )
        out = guided(x, t)
        assert out.shape == (3, 4, 8, 8)
        torch.testing.assert_close(out, guided_rep(x, t), rtol=1e-12, atol=1e-12)
        assert_differs(out, plain)


def test_guidance_scale_without_uncond_raises():
    model = tiny_unet2d_condition()
    with pytest.raises(ValueError, match="uncond"):
        sdo.Denoiser(model, cond={"encoder_hidden_states": randn(1, 5, 8, seed=0)}, guidance_scale=3.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        sdo.Denoiser(
            model,
            cond={"encoder_hidden_states": randn(1, 5, 8, seed=0)},
            uncond={"encoder_hidden_states": randn(1, 5, 8, seed=1)},
        )
    with pytest.raises(ValueError, match="uncond"):
        sdo.Chain.from_diffusers(
            model,
            DDIMScheduler(clip_sample=False),
            2,
            cond={"encoder_hidden_states": randn(1, 5, 8, seed=0)},
            guidance_scale=3.0,
        )


def test_mismatched_cond_uncond_raise():
    model = tiny_unet2d_condition()
    e = randn(1, 5, 8, seed=0)
    with pytest.raises(ValueError, match="same keys"):
        sdo.Denoiser(
            model,
            cond={"encoder_hidden_states": e},
            uncond={"encoder_hidden_states": e, "class_labels": None},
            guidance_scale=2.0,
        )
    with pytest.raises(ValueError, match="same keys"):
        sdo.Denoiser(model, cond={"encoder_hidden_states": e}, uncond={"encoder_attention_mask": e}, guidance_scale=2.0)
    x, t = randn(1, 4, 8, 8, seed=1), torch.tensor(10)
    # nested dicts must match key for key (checked when the two branches are batched)
    nested = sdo.Denoiser(
        model,
        cond={"encoder_hidden_states": e, "added_cond_kwargs": {"a": e}},
        uncond={"encoder_hidden_states": e, "added_cond_kwargs": {"b": e}},
        guidance_scale=2.0,
    )
    with pytest.raises(ValueError, match="same keys"):
        nested(x, t)
    # a tensor in cond needs a tensor in uncond
    half = sdo.Denoiser(
        model, cond={"encoder_hidden_states": e}, uncond={"encoder_hidden_states": None}, guidance_scale=2.0
    )
    with pytest.raises(ValueError, match="must be a tensor"):
        half(x, t)
    # non-tensor values cannot be batched, so they must be equal
    flags = sdo.Denoiser(
        model,
        cond={"encoder_hidden_states": e, "return_dict": True},
        uncond={"encoder_hidden_states": e, "return_dict": False},
        guidance_scale=2.0,
    )
    with pytest.raises(ValueError, match="differ"):
        flags(x, t)


# ---------------------------------------------------------------------------------------------------- 3. DiT


def test_dit_learned_sigma_gives_first_half():
    model = tiny_dit()
    x, t = randn(2, 4, 8, 8, seed=1), torch.tensor(400)
    labels = torch.tensor([2, 7])
    with torch.no_grad():
        out = sdo.Denoiser(model, cond={"class_labels": labels})(x, t)
        raw = model(x, timestep=t.expand(2), class_labels=labels).sample
    assert raw.shape == (2, 8, 8, 8)
    assert out.shape == (2, 4, 8, 8)
    assert torch.equal(out, raw[:, :4])
    assert_differs(raw[:, :4], raw[:, 4:])  # the halves differ, so taking the wrong one would fail


def test_dit_guided_chain_matches_diffusers_loop():
    model = tiny_dit()
    n, s, x = 3, 4.0, randn(2, 4, 8, 8, seed=2)
    labels, null = torch.tensor([1, 5]), torch.tensor([DIT_CLASSES])
    chain = sdo.Chain.from_diffusers(
        model,
        DDIMScheduler(clip_sample=False),
        n,
        cond={"class_labels": labels},
        uncond={"class_labels": null},
        guidance_scale=s,
    )
    with torch.no_grad():
        out = sdo.sample(chain, x)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()

    scheduler, latent = fresh(DDIMScheduler, n, clip_sample=False), x
    with torch.no_grad():  # DiTPipeline: guidance on the eps half, learned sigma dropped
        for t in scheduler.timesteps:
            raw = model(
                torch.cat([latent, latent]), timestep=t.expand(4), class_labels=torch.cat([null.expand(2), labels])
            ).sample
            u, c = raw[:, :4].chunk(2)
            latent = scheduler.step(u + s * (c - u), t, latent).prev_sample
    torch.testing.assert_close(out, latent, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- 4. PixArt


def test_pixart_passes_timestep_by_keyword():
    """PixArt's second positional parameter is encoder_hidden_states, not the timestep."""
    model = tiny_pixart()
    x, t, e = randn(2, 4, 8, 8, seed=1), torch.tensor(999), randn(1, 5, 8, seed=2)
    with torch.no_grad():
        out = sdo.Denoiser(model, cond={"encoder_hidden_states": e, "added_cond_kwargs": NO_EXTRA})(x, t)
        raw = model(
            x, encoder_hidden_states=e.expand(2, -1, -1), timestep=t.expand(2), added_cond_kwargs=NO_EXTRA
        ).sample
        other_t = model(
            x, encoder_hidden_states=e.expand(2, -1, -1), timestep=torch.tensor([10, 10]), added_cond_kwargs=NO_EXTRA
        ).sample
    assert out.shape == (2, 4, 8, 8)
    assert torch.equal(out, raw[:, :4])
    assert_differs(out, other_t[:, :4])


def test_pixart_guided_chain_dpmsolver_matches_diffusers_loop():
    model = tiny_pixart()
    n, s, x = 4, 4.5, randn(2, 4, 8, 8, seed=3)
    e, ue = randn(1, 5, 8, seed=4), randn(1, 5, 8, seed=5)
    chain = sdo.Chain.from_diffusers(
        model,
        DPMSolverMultistepScheduler(),
        n,
        cond={"encoder_hidden_states": e, "added_cond_kwargs": NO_EXTRA},
        uncond={"encoder_hidden_states": ue, "added_cond_kwargs": NO_EXTRA},
        guidance_scale=s,
    )
    with torch.no_grad():
        out = sdo.sample(chain, x)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()

    scheduler, latent = fresh(DPMSolverMultistepScheduler, n), x
    hidden = torch.cat([ue.expand(2, -1, -1), e.expand(2, -1, -1)])
    with torch.no_grad():  # PixArtAlphaPipeline: guidance, then the learned-sigma half dropped
        for t in scheduler.timesteps:
            raw = model(
                torch.cat([latent, latent]),
                encoder_hidden_states=hidden,
                timestep=t.expand(4),
                added_cond_kwargs=NO_EXTRA,
            ).sample
            u, c = raw.chunk(2)
            guided = (u + s * (c - u)).chunk(2, dim=1)[0]
            latent = scheduler.step(guided, t, latent).prev_sample
    torch.testing.assert_close(out, latent, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- 5. gradients


N_GRAD, S_GRAD = 3, 3.0


def _guided_setup():
    model = tiny_unet2d_condition().double()
    e, ue = randn(1, 5, 8, seed=11, dtype=F64), randn(1, 5, 8, seed=12, dtype=F64)
    x_T = randn(2, 4, 8, 8, seed=13, dtype=F64)
    weight = randn(2, 4, 8, 8, seed=14, dtype=F64)  # J(x0) = <weight, x0>
    chain = sdo.Chain.from_diffusers(
        model,
        DDIMScheduler(clip_sample=False),
        N_GRAD,
        cond={"encoder_hidden_states": e},
        uncond={"encoder_hidden_states": ue},
        guidance_scale=S_GRAD,
    )
    return model, e, ue, x_T, weight, chain


def _reference_loop(model, e, ue, x, keep) -> torch.Tensor:
    """A pipeline-style DDIM loop with CFG; only the model call of the steps in ``keep`` records a graph.

    The fresh scheduler's tables are cast to float64 (same values): sdo computes its coefficients in float64
    from them, so the comparison can be tight instead of limited by float32 scheduler arithmetic.
    """
    scheduler = fresh(DDIMScheduler, N_GRAD, clip_sample=False)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    hidden = torch.cat([ue.expand(2, -1, -1), e.expand(2, -1, -1)])
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i in keep):
            u, c = model(torch.cat([x, x]), t, encoder_hidden_states=hidden).sample.chunk(2)
            eps = u + S_GRAD * (c - u)
        x = scheduler.step(eps, t, x).prev_sample  # the scheduler update keeps its graph
    return x


def _latent_grad(fn, x_T, weight):
    x = x_T.clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad((out * weight).sum(), x)
    return out.detach(), grad


def test_shortcut_latent_gradient_equals_reference_loop():
    model, e, ue, x_T, weight, chain = _guided_setup()
    out, grad = _latent_grad(lambda x: sdo.sample(chain, x, strategy="sdo"), x_T, weight)
    ref_out, ref_grad = _latent_grad(lambda x: _reference_loop(model, e, ue, x, keep={0}), x_T, weight)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11)
    # the shortcut is not the full gradient: the reference would not catch a strategy that kept every graph
    _, full_ref = _latent_grad(lambda x: _reference_loop(model, e, ue, x, keep=range(N_GRAD)), x_T, weight)
    assert_differs(grad, full_ref, min_gap=1e-3 * full_ref.abs().max().item())


def test_checkpoint_gradient_equals_full_gradient():
    model, e, ue, x_T, weight, chain = _guided_setup()
    out_full, g_full = _latent_grad(lambda x: sdo.sample(chain, x, strategy="full"), x_T, weight)
    out_ckpt, g_ckpt = _latent_grad(lambda x: sdo.sample(chain, x, strategy="checkpoint"), x_T, weight)
    torch.testing.assert_close(out_ckpt, out_full, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(g_ckpt, g_full, rtol=1e-12, atol=1e-12)
    # and both are the gradient of the pipeline loop
    _, g_ref = _latent_grad(lambda x: _reference_loop(model, e, ue, x, keep=range(N_GRAD)), x_T, weight)
    torch.testing.assert_close(g_full, g_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("k", [1, 2])
def test_shortcut_parameter_gradient_equals_reference_loop(k):
    model, e, ue, x_T, weight, chain = _guided_setup()
    params = [p for p in model.parameters() if p.requires_grad]

    def param_grads(out):
        grads = torch.autograd.grad((out * weight).sum(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]

    got = param_grads(sdo.sample(chain, x_T, strategy=sdo.Shortcut(at=k)))
    want = param_grads(_reference_loop(model, e, ue, x_T, keep={k}))
    nonzero = sum(bool(g.abs().max() > 0) for g in want)
    assert nonzero > len(params) // 2  # the check covers most of the network
    for p_got, p_want in zip(got, want, strict=True):
        torch.testing.assert_close(p_got, p_want, rtol=1e-9, atol=1e-11)
    # another step's parameter gradient is different
    other = param_grads(_reference_loop(model, e, ue, x_T, keep={0}))
    assert max((a - b).abs().max().item() for a, b in zip(got, other, strict=True)) > 1e-6


# --------------------------------------------------------------------------------------------------- 6. plain callables


@dataclass
class _Output:
    sample: torch.Tensor


def test_callable_returning_tensor_tuple_or_sample():
    x, t = randn(2, 3, 4, 4, seed=1), torch.tensor(250)
    expected = 2.0 * x + 0.001 * 250
    returns = {
        "tensor": lambda out: out,
        "tuple": lambda out: (out, "ignored"),
        "sample": lambda out: _Output(sample=out),
    }
    for name, wrap in returns.items():
        seen = {}

        def model(sample, timestep, scale=1.0, wrap=wrap, seen=seen):
            seen["timestep"] = timestep
            seen["scale"] = scale
            return wrap(scale * sample + 0.001 * timestep.reshape(-1, 1, 1, 1))

        out = sdo.Denoiser(model, cond={"scale": 2.0})(x, t)
        assert torch.is_tensor(out), name
        torch.testing.assert_close(out, expected, msg=name)
        assert seen["scale"] == 2.0
        assert seen["timestep"].shape == (2,) and seen["timestep"].tolist() == [250, 250]


def test_callable_without_timestep_parameter_gets_t_positionally():
    calls = []

    def model(x, t, **kwargs):
        calls.append((t, kwargs))
        return x * t.reshape(-1, 1)

    x = randn(3, 2, seed=2)
    out = sdo.Denoiser(model, cond={"extra": torch.ones(1, 2)})(x, torch.tensor(4.0))
    torch.testing.assert_close(out, 4.0 * x)
    (t, kwargs), = calls
    assert t.tolist() == [4.0, 4.0, 4.0]
    assert set(kwargs) == {"extra"} and kwargs["extra"].shape == (3, 2)  # batch-1 tensor broadcast


def test_callable_with_timestep_keyword_gets_it_by_name():
    """Like PixArt: the second positional parameter is not the timestep."""

    def model(x, encoder_hidden_states=None, timestep=None):
        return x * timestep.reshape(-1, 1) + encoder_hidden_states

    x, h = randn(2, 3, seed=3), randn(1, 3, seed=4)
    out = sdo.Denoiser(model, cond={"encoder_hidden_states": h})(x, torch.tensor(5.0))
    torch.testing.assert_close(out, 5.0 * x + h)


def test_module_forward_signature_is_read():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x, y=None, timestep=None):  # y would receive a positional t
            return self.w * x + timestep.reshape(-1, 1) + (0 if y is None else y)

    x = randn(2, 3, seed=5)
    with torch.no_grad():
        out = sdo.Denoiser(Net())(x, torch.tensor(1.5))
    torch.testing.assert_close(out, 2.0 * x + 1.5)


def test_plain_callable_in_a_chain():
    """eps = 0 makes DDIM a pure rescaling: x0 = x_T * sqrt(final_alpha_cumprod / alpha_cumprod[t_first])."""
    scheduler = DDIMScheduler(clip_sample=False)
    chain = sdo.Chain.from_diffusers(lambda x, t: torch.zeros_like(x), scheduler, 4)
    x = randn(2, 3, 4, 4, seed=6, dtype=F64)
    out = sdo.sample(chain, x)
    first = fresh(DDIMScheduler, 4, clip_sample=False).timesteps[0]
    a = scheduler.alphas_cumprod.double()[first]
    torch.testing.assert_close(out, x / a.sqrt(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("in_channels", "out_channels", "kept"), [(2, 4, 2), (2, 3, 3), (2, None, 5), (None, 4, 4)])
def test_only_twice_the_channels_is_a_learned_variance(in_channels, out_channels, kept):
    """The first half is taken only when config.out_channels == 2 * config.in_channels."""

    def model(x, timestep):
        n = out_channels or 5
        return x[:, :1] * torch.arange(1.0, n + 1).view(1, -1, 1, 1)  # channel c is (c + 1) x[:, 0]

    model.config = type("Config", (), {"in_channels": in_channels, "out_channels": out_channels})()
    x = randn(2, 2, 3, 3, seed=7)
    out = sdo.Denoiser(model)(x, torch.tensor(1))
    assert out.shape == (2, kept, 3, 3)
    torch.testing.assert_close(out, x[:, :1] * torch.arange(1.0, kept + 1).view(1, -1, 1, 1))


def test_unet2d_with_learned_variance_gives_first_half():
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=6, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    x, t = randn(2, 3, 8, 8, seed=8), torch.tensor(600)
    with torch.no_grad():
        raw = model(x, t).sample
        out = sdo.Denoiser(model)(x, t)
    assert raw.shape == (2, 6, 8, 8)
    assert torch.equal(out, raw[:, :3])


def test_non_callable_and_bad_output_raise():
    with pytest.raises(TypeError, match="callable"):
        sdo.Denoiser(42)
    with pytest.raises(TypeError, match="returned"):
        sdo.Denoiser(lambda x, t: {"sample_dict": x})(randn(1, 2, seed=0), torch.tensor(1))


# ---------------------------------------------------------------------------------------------------- 7. errors


def test_wrong_channel_count_raises():
    model = tiny_unet2d_condition()
    chain = sdo.Chain.from_diffusers(
        model, DDIMScheduler(clip_sample=False), 2, cond={"encoder_hidden_states": randn(1, 5, 8, seed=0)}
    )
    with pytest.raises(ValueError, match="channels"):
        sdo.sample(chain, randn(1, 3, 8, 8, seed=1))
    with pytest.raises(ValueError, match="channels"):
        sdo.Denoiser(tiny_dit()).check(randn(1, 8, 8, 8, seed=1))  # out_channels is not in_channels


def test_dtype_mismatch_raises():
    model = tiny_unet2d().double()
    chain = sdo.Chain.from_diffusers(
        model, DDIMScheduler(clip_sample=False), 2, cond={"class_labels": torch.tensor([1])}
    )
    with pytest.raises(ValueError, match="dtype"):
        sdo.sample(chain, randn(1, 3, 8, 8, seed=1))  # float32 latent, float64 model
    sdo.Denoiser(model).check(randn(1, 3, 8, 8, seed=1, dtype=F64))  # the matching latent passes


def test_device_mismatch_raises():
    model = tiny_unet2d(num_class_embeds=None).to("meta")
    assert next(model.parameters()).device.type == "meta"
    chain = sdo.Chain.from_diffusers(model, DDIMScheduler(clip_sample=False), 2)
    with pytest.raises(ValueError, match=r"device mismatch: latent on cpu, model on meta"):
        sdo.sample(chain, randn(1, 3, 8, 8, seed=1))


def test_non_float_latent_raises():
    with pytest.raises(TypeError, match="floating-point"):
        sdo.Denoiser(tiny_unet2d()).check(torch.zeros(1, 3, 8, 8, dtype=torch.long))


# ------------------------------------------------------------------------------- per-item timesteps, nested cond


def test_per_sample_timesteps_with_guidance():
    model = tiny_unet2d_condition().double()
    x, t = randn(2, 4, 8, 8, seed=1, dtype=F64), torch.tensor([900, 100])
    e, ue = randn(2, 5, 8, seed=2, dtype=F64), randn(2, 5, 8, seed=3, dtype=F64)
    with torch.no_grad():
        unguided = sdo.Denoiser(model, cond={"encoder_hidden_states": e})(x, t)
        torch.testing.assert_close(unguided, model(x, t, encoder_hidden_states=e).sample, rtol=1e-12, atol=1e-12)
        out = sdo.Denoiser(
            model, cond={"encoder_hidden_states": e}, uncond={"encoder_hidden_states": ue}, guidance_scale=3.0
        )(x, t)
        c = model(x, t, encoder_hidden_states=e).sample
        u = model(x, t, encoder_hidden_states=ue).sample
    torch.testing.assert_close(out, u + 3.0 * (c - u), rtol=1e-10, atol=1e-12)


def _controlnet_residuals(batch: int, seed: int):
    """Shapes of the tiny UNet2DConditionModel's down-block outputs and mid block (ControlNet residuals)."""
    shapes = [(4, 8, 8), (4, 8, 8), (4, 4, 4), (8, 4, 4)]
    down = tuple(0.1 * randn(batch, *s, seed=seed + j, dtype=F64) for j, s in enumerate(shapes))
    return down, 0.1 * randn(batch, 8, 4, 4, seed=seed + 10, dtype=F64)


def test_tuple_of_tensors_in_cond_is_batched_for_guidance():
    model = tiny_unet2d_condition().double()
    x, t, s = randn(2, 4, 8, 8, seed=1, dtype=F64), torch.tensor(500), 2.0
    e, ue = randn(2, 5, 8, seed=2, dtype=F64), randn(2, 5, 8, seed=3, dtype=F64)
    down_c, mid_c = _controlnet_residuals(2, seed=20)
    down_u, mid_u = _controlnet_residuals(2, seed=40)
    cond = {
        "encoder_hidden_states": e, "down_block_additional_residuals": down_c, "mid_block_additional_residual": mid_c
    }
    uncond = {
        "encoder_hidden_states": ue, "down_block_additional_residuals": down_u, "mid_block_additional_residual": mid_u
    }
    with torch.no_grad():
        c = model(x, t, **cond).sample
        u = model(x, t, **uncond).sample
        out = sdo.Denoiser(model, cond=cond, uncond=uncond, guidance_scale=s)(x, t)
    torch.testing.assert_close(out, u + s * (c - u), rtol=1e-10, atol=1e-12)
