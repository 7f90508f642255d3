"""Noise optimization (issue #20): ReNO's norm prior and DNO's probability regularizer against hand-written formulas
in float64, their gradients added to the objective's in ``optimize_latent``, and ``sdo noise`` end to end on the
embedded digits and on the tiny Stable Diffusion folder."""

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler
from helpers import TinyNet

import sdo
from sdo.cli import main


def _noise(batch=2, shape=(4, 8, 8), scale=1.0, shift=0.0, seed=0):
    z = torch.randn(batch, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return z * scale + shift


def test_norm_prior_is_the_chi_negative_log_likelihood():
    """weight (r^2 / 2 - (d - 1) log r), 0 at r = sqrt(d - 1); gradient weight (z - (d - 1) z / r^2)."""
    z = _noise().requires_grad_(True)
    d = z[0].numel()
    r = z.detach().flatten(1).norm(dim=1)
    expected = 0.5 * (r**2 / 2 - (d - 1) * r.log() - ((d - 1) / 2 - (d - 1) / 2 * math.log(d - 1)))
    penalty = sdo.NormPrior(0.5)(z)
    torch.testing.assert_close(penalty.detach(), expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(penalty.sum(), z)
    torch.testing.assert_close(grad, 0.5 * (z - (d - 1) * z / (r**2).view(-1, 1, 1, 1)).detach(), rtol=1e-10,
                               atol=1e-12)
    on_shell = torch.ones(1, d, dtype=torch.float64) * math.sqrt((d - 1) / d)
    torch.testing.assert_close(sdo.NormPrior(1.0)(on_shell), torch.zeros(1, dtype=torch.float64), atol=1e-9, rtol=0)


def _dno_by_hand(z: torch.Tensor, block: int) -> float:
    """DNO's two capped log-bounds of one item's blocks in stored order, by hand (eigenvalues for |C - I|_2)."""
    flat = z.flatten()
    n = flat.numel() // block
    b = flat[: n * block].reshape(n, block)
    m = b.mean(0)
    c = b.T @ b / n
    spread = torch.linalg.eigvalsh(c - torch.eye(block, dtype=z.dtype)).abs().max()
    log_mean = min(-n * float(m @ m) / (2 * block), -math.log(2))
    excess = max(math.sqrt(1 + spread) - 1 - math.sqrt(block / n), 0.0)
    log_moment = min(-n * excess**2 / 2, -math.log(2))
    return -(log_mean + log_moment) - 2 * math.log(2)


@pytest.mark.parametrize(("scale", "shift"), [(1.0, 0.0), (1.6, 0.0), (1.0, 0.3), (0.5, 0.0)])
def test_probability_regularizer_matches_the_bounds_and_is_zero_for_a_draw(scale, shift):
    """With no shuffles, the penalty is DNO's formula by hand; a fresh Gaussian draw pays 0 (and gets no gradient);
    a noise scaled by 1.6, shrunk by 0.5 or shifted by 0.3 pays, and its gradient pulls it back (1024 elements an
    item: 256 blocks of 4)."""
    z = _noise(shape=(4, 16, 16), scale=scale, shift=shift).requires_grad_(True)
    penalty = sdo.ProbabilityRegularizer(2.0, block=4, shuffles=0)(z)
    expected = torch.tensor([2.0 * _dno_by_hand(item, 4) for item in z.detach()], dtype=torch.float64)
    torch.testing.assert_close(penalty.detach(), expected, rtol=1e-9, atol=1e-9)
    (grad,) = torch.autograd.grad(penalty.sum(), z)
    if scale == 1.0 and shift == 0.0:
        assert penalty.abs().max() == 0 and grad.abs().max() == 0
    else:
        assert (penalty > 0).all()
        step = z.detach() - 1e-3 * grad  # a small step down the penalty's gradient lowers it
        assert (sdo.ProbabilityRegularizer(2.0, block=4, shuffles=0)(step) < penalty.detach()).all()
    shuffled = sdo.ProbabilityRegularizer(1.0, shuffles=5, seed=1)(z)
    assert shuffled.shape == (2,) and torch.isfinite(shuffled).all()


def test_probability_regularizer_is_loose_on_a_small_latent():
    """At 256 elements an item (the digits' 1x16x16: 64 blocks of 4) DNO's moment bound does not see a noise shrunk
    to half its scale: sqrt(1 + 0.75) - 1 - sqrt(4 / 64) = 0.07, and 64 * 0.07^2 / 2 < log 2, so it pays nothing;
    ReNO's norm prior does."""
    z = _noise(shape=(1, 16, 16), scale=0.5)
    assert sdo.ProbabilityRegularizer(1.0, shuffles=0)(z).abs().max() == 0
    assert (sdo.NormPrior(1.0)(z) > 10).all()


def test_optimize_latent_adds_the_regularizers_gradient():
    """One plain SGD step (lr 1): latent - (d objective / d latent + d penalty / d latent); the losses are the
    objective's, the penalties recorded apart; a penalty of the wrong shape is refused."""
    model = TinyNet().double()
    chain = sdo.Chain.from_diffusers(model, DDIMScheduler(clip_sample=False), 4)
    x = _noise(shape=(2, 4, 4))
    weight = _noise(shape=(2, 4, 4), seed=1)

    def objective(x0):
        return (torch.sin(x0) * weight).flatten(1).sum(1)

    prior = sdo.NormPrior(0.5)
    result = sdo.optimize_latent(chain, x, objective, strategy="full", iterations=1, lr=1.0, optimizer="sgd",
                                 regularizer=prior, progress=False)
    latent = x.clone().requires_grad_(True)
    (g_obj,) = torch.autograd.grad(objective(sdo.sample(chain, latent, strategy="full")).sum(), latent)
    (g_pen,) = torch.autograd.grad(prior(latent).sum(), latent)
    torch.testing.assert_close(result.latent, x - g_obj - g_pen, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.tensor(result.losses[0], dtype=torch.float64),
                               objective(sdo.sample(chain, x)).mean(), rtol=1e-10, atol=1e-12)
    assert result.penalties == pytest.approx([prior(x).mean().item()])
    with pytest.raises(sdo.UsageError, match=r"regularizer returned .*one penalty per item, shape \(2,\)"):
        sdo.optimize_latent(chain, x, objective, iterations=1, regularizer=lambda z: z.sum(), progress=False)


def _run(argv, tmp_path):
    code = main(["noise", *argv, "--no-progress", "--output", str(tmp_path / "out")])
    assert code == 0
    assert (tmp_path / "out" / "before_after.png").is_file() and (tmp_path / "out" / "loss.png").is_file()
    return json.loads((tmp_path / "out" / "metrics.json").read_text())


@pytest.mark.parametrize("regularizer", ["none", "dno"])
def test_sdo_noise_on_the_digits(tmp_path, regularizer):
    """`sdo noise`: the digits' noises at 4 DDIM steps, 3 Adam steps on class:1,ink:0.1; the best sample never scores
    below the first; the judge's reading and the noise statistics before and after are written."""
    metrics = _run(["--reward", "class:1,ink:0.1", "--count", "2", "--steps", "4", "--iterations", "3",
                    "--regularizer", regularizer], tmp_path)
    assert all(a >= b - 1e-5 for a, b in zip(metrics["reward_after"], metrics["reward_before"], strict=True))
    for key in ("judge_target", "judge_rejected", "classifier_target", "norm_ratio", "dno_penalty", "reno_penalty"):
        assert f"{key}_before" in metrics and f"{key}_after" in metrics
    assert len(metrics.get("penalties", [])) == (3 if regularizer == "dno" else 0)  # written when a penalty ran
    assert metrics["command"] == "noise" and "prompt" not in metrics  # the digits take no prompt
    assert metrics["reg_weight"] == (1.0 if regularizer == "dno" else 0.0)


def test_sdo_noise_on_a_pipeline_with_weighted_rewards(pipeline_folder, clip, tokenizer, tmp_path):
    """`sdo noise --model`: the tiny Stable Diffusion at 2 steps, CLIP score plus half PickScore, ReNO's prior."""
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    metrics = _run(["--model", str(pipeline_folder), "--prompt", "a red square", "--reward", "clip:1,pickscore:0.5",
                    "--clip", str(tmp_path / "clip"), "--pickscore", str(tmp_path / "clip"), "--steps", "2",
                    "--iterations", "2", "--regularizer", "reno"], tmp_path)
    assert metrics["reward_after"][0] >= metrics["reward_before"][0] - 1e-4
    assert len(metrics["penalties"]) == 2 and metrics["reg_weight"] == 0.01
    assert metrics["prompt"] == "a red square"
