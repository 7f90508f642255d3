"""optimize_latent and sample: results, constraints, reproducibility and loud errors."""

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, UNet2DModel
from helpers import TinyNet

import sdo


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
        norm_num_groups=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=2,
    ).eval().requires_grad_(False)


def _x(shape=(3, 1, 8, 8), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


TARGET = torch.linspace(-0.5, 0.5, 64).reshape(1, 1, 8, 8)


def _objective(x0):
    return ((x0 - TARGET) ** 2).mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def chain():
    return sdo.Chain.from_diffusers(_tiny_unet(), DDIMScheduler(clip_sample=False), 10)


@pytest.mark.parametrize("strategy", ["sdo", "full", "checkpoint", "truncated"])
def test_loss_decreases_and_result_is_consistent(chain, strategy):
    x = _x()
    result = sdo.optimize_latent(chain, x, _objective, strategy=strategy, iterations=15, lr=0.05, progress=False)
    assert len(result.losses) == 15 and result.item_losses.shape == (15, 3)
    assert result.final_loss.mean() < 0.8 * result.losses[0]
    with torch.no_grad():
        resampled = sdo.sample(chain, result.latent)
    torch.testing.assert_close(result.sample, resampled)
    torch.testing.assert_close(result.final_loss, _objective(resampled))
    # the best sample per item is the lowest loss ever seen, and it is that item's loss
    seen = torch.cat([result.item_losses, result.final_loss[None]])
    torch.testing.assert_close(result.best_loss, seen.min(dim=0).values)
    torch.testing.assert_close(_objective(result.best_sample), result.best_loss, rtol=1e-5, atol=1e-6)
    assert not torch.equal(result.latent, x) and result.seconds > 0


def test_frozen_model_gets_no_parameter_gradients():
    model = TinyNet()
    chain = sdo.Chain.from_diffusers(model, DDIMScheduler(clip_sample=False), 5)
    sdo.optimize_latent(chain, _x((2, 2, 4, 4)), lambda x0: x0.pow(2).sum(), iterations=2, progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_linf_ball_constraint(chain):
    x = _x()
    radius = 0.02
    result = sdo.optimize_latent(
        chain, x, _objective, iterations=6, lr=0.5, constraint=sdo.LinfBall(radius), progress=False
    )
    moved = (result.latent - x).abs().max().item()
    assert moved <= radius + 1e-7 and moved > 0.9 * radius  # the step is large, so the ball is binding
    with pytest.raises(ValueError):
        sdo.LinfBall(0)


def test_callback_stops_early_and_sees_losses(chain):
    seen = []

    def callback(iteration, x0, loss):
        seen.append((iteration, x0.shape, loss.shape))
        return iteration == 2

    result = sdo.optimize_latent(chain, _x(), _objective, iterations=10, callback=callback, progress=False)
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1:] == ((3, 1, 8, 8), (3,))
    assert len(result.losses) == 3


def test_intermediate_start(chain):
    with torch.no_grad():
        x_mid = sdo.sample(chain, _x(), stop=6)
    result = sdo.optimize_latent(chain, x_mid, _objective, start=6, iterations=8, lr=0.05, progress=False)
    assert result.final_loss.mean() < result.losses[0]
    with torch.no_grad():
        torch.testing.assert_close(result.sample, sdo.sample(chain, result.latent, start=6))


def test_stochastic_solver_uses_one_noise_and_is_reproducible():
    model = _tiny_unet()
    chain = sdo.Chain.from_diffusers(model, LCMScheduler(), 4)
    runs = [
        sdo.optimize_latent(chain, _x(), _objective, iterations=4, progress=False,
                            generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].latent, runs[1].latent) and runs[0].losses == runs[1].losses
    # the final sample is the chain's sample of the final latent under the same noise
    with torch.no_grad():
        again = sdo.sample(chain, runs[0].latent, generator=torch.Generator().manual_seed(3))
        other = sdo.sample(chain, runs[0].latent, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(runs[0].sample, again)
    assert not torch.allclose(runs[0].sample, other)


def test_optimizer_choices(chain):
    for opt in ("sgd", "adamw", lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.9))):
        result = sdo.optimize_latent(chain, _x(), _objective, iterations=2, optimizer=opt, lr=0.01, progress=False)
        assert len(result.losses) == 2
    with pytest.raises(ValueError, match="unknown optimizer"):
        sdo.optimize_latent(chain, _x(), _objective, iterations=1, optimizer="lbfgs", progress=False)


@pytest.mark.parametrize("rule", ["plain", "sign"])
def test_sgd_is_plain_gradient_descent_and_sign_is_pgd(chain, rule):
    """optimizer="sgd": x <- P(x - lr g), g Full's gradient of the summed loss; step_rule="sign": x <- P(x - lr sign g)
    (PGD), P the projection onto the L-infinity ball; two iterations against a hand-written loop."""
    x, lr, ball = _x(), 0.3, sdo.LinfBall(0.05)
    result = sdo.optimize_latent(chain, x, _objective, strategy="full", iterations=2, optimizer="sgd", lr=lr,
                                 step_rule=rule, constraint=ball, progress=False)
    ref = x.clone()
    for _ in range(2):
        latent = ref.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_objective(sdo.sample(chain, latent)).sum(), latent)
        ref = ball(ref - lr * (g.sign() if rule == "sign" else g), x)
    torch.testing.assert_close(result.latent, ref, rtol=1e-5, atol=1e-6)
    assert not torch.equal(result.latent, x)
    with pytest.raises(ValueError, match="step_rule"):
        sdo.optimize_latent(chain, x, _objective, iterations=1, step_rule="sgn", progress=False)


def test_clamped_objective_sees_the_clamped_sample():
    seen = []
    objective = sdo.objectives.Clamped(lambda x0: seen.append(x0) or x0.flatten(1).sum(1))
    x0 = torch.tensor([[-3.0, 0.5, 2.0]], requires_grad=True)
    loss = objective(x0)
    assert seen[0].tolist() == [[-1.0, 0.5, 1.0]] and loss.tolist() == [0.5]
    (g,) = torch.autograd.grad(loss.sum(), x0)
    assert g.tolist() == [[0.0, 1.0, 0.0]]  # no gradient where the clamp is active


def test_scalar_objective_tracks_the_whole_batch(chain):
    result = sdo.optimize_latent(chain, _x(), lambda x0: _objective(x0).mean(), iterations=3, progress=False)
    assert result.best_loss.shape == (1,) and result.item_losses.shape == (3, 1)
    assert result.best_sample.shape == (3, 1, 8, 8)


def test_objective_independent_of_sample_raises(chain):
    with pytest.raises(ValueError, match="does not depend on the sample"):
        sdo.optimize_latent(chain, _x(), lambda x0: torch.ones(3), iterations=1, progress=False)
    with pytest.raises(ValueError, match="does not depend on the sample"):
        sdo.optimize_latent(chain, _x(), lambda x0: _objective(x0.detach()), iterations=1, progress=False)
    weight = torch.ones((), requires_grad=True)  # an objective with parameters of its own, ignoring x0
    with pytest.raises(ValueError, match="does not depend on the sample"):
        sdo.optimize_latent(chain, _x(), lambda x0: weight * torch.ones(3), iterations=1, progress=False)


def test_non_finite_loss_names_the_iteration(chain):
    calls = []

    def objective(x0):
        calls.append(1)
        loss = _objective(x0)
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(ValueError, match="non-finite loss at iteration 2"):
        sdo.optimize_latent(chain, _x(), objective, iterations=5, progress=False)


def test_bad_objective_shape(chain):
    with pytest.raises(ValueError, match="one loss per item"):
        sdo.optimize_latent(chain, _x(), lambda x0: x0.mean(dim=(2, 3)), iterations=1, progress=False)


def test_cut_gradient_path_is_an_error_not_a_zero_step():
    """DDIM with x0-prediction and alpha_prev = 1 makes the last step x_N = model output: SDO at the first
    step gives an exactly zero latent gradient, which must not pass silently; Truncated(1) works."""
    model = TinyNet(channels=1)
    scheduler = DDIMScheduler(clip_sample=False, prediction_type="sample")
    chain = sdo.Chain.from_diffusers(model, scheduler, 5)
    objective = lambda x0: (x0**2).sum(dim=(1, 2, 3))
    with pytest.raises(ValueError, match="receives none"):
        sdo.optimize_latent(chain, _x(), objective, strategy="sdo", iterations=2, progress=False)
    result = sdo.optimize_latent(chain, _x(), objective, strategy="truncated", iterations=2, progress=False)
    assert not torch.equal(result.latent, _x())


def test_sample_argument_errors(chain):
    x = _x()
    with pytest.raises(ValueError, match="start=10 is out of range"):
        sdo.sample(chain, x, start=10)
    with pytest.raises(ValueError, match="start=-1 is out of range"):
        sdo.sample(chain, x, start=-1)
    with pytest.raises(ValueError, match="stop=3 is out of range"):
        sdo.sample(chain, x, start=3, stop=3)
    with pytest.raises(TypeError, match="start must be an int"):
        sdo.sample(chain, x, start=2.0)
    with pytest.raises(ValueError, match="unknown strategy"):
        sdo.sample(chain, x, strategy="adjoint-typo")
    with pytest.raises(ValueError, match="channels"):
        sdo.sample(chain, torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="dtype"):
        sdo.sample(chain, x.double())
    with pytest.raises(ValueError, match="iterations"):
        sdo.optimize_latent(chain, x, _objective, iterations=0, progress=False)
    with pytest.raises(TypeError):
        sdo.Chain(TinyNet(), DDIMScheduler())
