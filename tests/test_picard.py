"""Picard sampling (sdo.picard_sample, ParaDiGMS) and SDO on top of it: the fixed point is the sequential sample
(Prop. 4.1) for every supported solver, multistep and stochastic ones included, exactly with tol = 0 and to the
tolerance otherwise; Shortcut(picard=...) has Shortcut's gradient at convergence; optimize_latent(picard=True)
warm-starts each iteration from the last trajectory."""

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from helpers import CASE_IDS, SCHEDULER_CASES, TinyNet

import sdo


def _unet_chain(eta=0.0, steps=10, guided=False):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                       num_class_embeds=3).double().eval().requires_grad_(False)
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    cond = {"class_labels": torch.tensor([0, 1, 2])}
    extra = {"uncond": {"class_labels": torch.tensor([2])}, "guidance_scale": 2.0} if guided else {}
    return sdo.Chain.from_diffusers(unet, scheduler, steps, cond=cond, eta=eta, **extra)


def _x(chain, seed=1, shape=(3, 1, 8, 8)):
    return (torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            * chain.init_noise_sigma)


def _seed(s=2):
    return torch.Generator().manual_seed(s)


@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=CASE_IDS)
def test_fixed_point_is_the_sequential_sample_for_every_solver(case):
    _, make, chain_kw, _ = case
    chain = sdo.Chain.from_diffusers(TinyNet().double(), make(), 8, **chain_kw)
    x = _x(chain, shape=(2, 2, 5, 5))
    with torch.no_grad():
        reference = sdo.sample(chain, x, generator=_seed())
    exact = sdo.picard_sample(chain, x, window=3, tol=0.0, generator=_seed())
    assert exact.converged  # (sweeps <= N would hold anyway: max_sweeps defaults to N)
    torch.testing.assert_close(exact.sample, reference, rtol=1e-9, atol=1e-9)
    loose = sdo.picard_sample(chain, x, window=3, tol=1e-2, generator=_seed())
    assert loose.converged and loose.sweeps <= exact.sweeps
    scale = reference.abs().max()
    assert (loose.sample - reference).abs().max() < 0.05 * scale


@pytest.mark.parametrize("eta,window,guided", [(0.0, None, False), (0.0, 3, True), (1.0, 4, False)])
def test_picard_equals_sequential_sampling_on_a_unet(eta, window, guided):
    chain = _unet_chain(eta, guided=guided)
    x = _x(chain)
    reference = sdo.sample(chain, x, generator=_seed())
    exact = sdo.picard_sample(chain, x, window=window, tol=0.0, generator=_seed())
    assert exact.converged
    torch.testing.assert_close(exact.sample, reference, rtol=1e-10, atol=1e-10)
    assert len(exact.trajectory) == len(exact.outputs) + 1 == len(chain) + 1
    loose = sdo.picard_sample(chain, x, window=window, tol=1e-3, generator=_seed())
    assert loose.converged and loose.sweeps < exact.sweeps
    assert (loose.sample - reference).abs().max() < 1e-2
    assert len(chain) <= loose.calls <= loose.sweeps * (window or len(chain))  # every step at least once


@pytest.mark.parametrize("sweeps", [1, 3, 6])
def test_k_sweeps_make_the_first_k_steps_exact(sweeps):
    """What Picard iteration guarantees (the paper's Prop. 4.1, ParaDiGMS): after k sweeps over the whole chain, the
    first k steps' latents are the sequential ones, whatever the later ones are."""
    chain = _unet_chain()
    x = _x(chain)
    with torch.no_grad():
        reference = [x]
        state = chain.init_state(x)
        for i in range(len(chain)):
            latent, state = chain.step(i, reference[-1], state)
            reference.append(latent)
    short = sdo.picard_sample(chain, x, tol=0.0, max_sweeps=sweeps)
    assert short.sweeps == sweeps and not short.converged
    for i in range(sweeps + 1):
        torch.testing.assert_close(short.trajectory[i], reference[i], rtol=1e-12, atol=1e-12)


def test_few_sweeps_stop_early_and_say_so():
    chain = _unet_chain()
    x = _x(chain)
    short = sdo.picard_sample(chain, x, tol=0.0, max_sweeps=2)
    assert not short.converged and short.sweeps == 2
    with pytest.warns(RuntimeWarning, match="before converging"):
        sdo.sample(chain, x, strategy=sdo.Shortcut(picard=sdo.Picard(tol=0.0, max_sweeps=2)))


def test_a_part_of_the_chain():
    chain = _unet_chain()
    x = _x(chain)
    with torch.no_grad():
        reference = sdo.sample(chain, x, start=3, stop=8)
    result = sdo.picard_sample(chain, x, start=3, stop=8, tol=0.0)
    assert len(result.trajectory) == 6
    torch.testing.assert_close(result.sample, reference, rtol=1e-10, atol=1e-10)


def test_warm_start_from_the_fixed_point_takes_one_sweep():
    chain = _unet_chain()
    x = _x(chain)
    first = sdo.picard_sample(chain, x, tol=1e-6)
    again = sdo.picard_sample(chain, x, tol=1e-6, init=first.trajectory)
    assert first.sweeps > 1 and again.sweeps == 1 and again.calls == len(chain)
    torch.testing.assert_close(again.sample, first.sample, rtol=1e-8, atol=1e-8)


def _gradients(chain, x, strategy, params, start=0):
    latent = x.clone().requires_grad_(True)
    out = sdo.sample(chain, latent, strategy=strategy, start=start, generator=_seed())
    loss = (out**2).sum() + out.sin().sum()
    return out.detach(), torch.autograd.grad(loss, [latent, *params])


@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("at", [0, 4])
def test_picard_sdo_gradient_is_shortcuts_at_convergence(case, at):
    _, make, chain_kw, _ = case
    model = TinyNet().double()
    chain = sdo.Chain.from_diffusers(model, make(), 6, **chain_kw)
    x, params = _x(chain, shape=(2, 2, 5, 5)), list(model.parameters())
    value, reference = _gradients(chain, x, sdo.Shortcut(at=at), params)
    got_value, got = _gradients(chain, x, sdo.Shortcut(at=at, picard=sdo.Picard(window=2, tol=0.0)), params)
    torch.testing.assert_close(got_value, value, rtol=1e-9, atol=1e-9)
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8 * b.abs().max().item())
    assert reference[0].abs().sum() > 0 and sum(r.abs().sum() for r in reference[1:]) > 0


def test_picard_sdo_gradient_on_a_guided_unet_from_a_later_step():
    chain = _unet_chain(guided=True)
    x, params = _x(chain), list(chain.denoiser.model.parameters())[:4]
    for p in params:
        p.requires_grad_(True)
    value, reference = _gradients(chain, x, sdo.Shortcut(at=5), params, start=2)
    picard = sdo.Picard(window=4, tol=0.0)
    got_value, got = _gradients(chain, x, sdo.Shortcut(at=5, picard=picard), params, start=2)
    sweeps = picard(chain, x, chain.init_state(x, _seed()), range(2, len(chain)))  # what the Shortcut ran
    assert sweeps.converged and sweeps.calls >= 8
    torch.testing.assert_close(got_value, value, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    # at a working tolerance the gradient stays close (the sweeps' outputs are within tol of the fixed point)
    _, loose = _gradients(chain, x, sdo.Shortcut(at=5, picard=sdo.Picard(window=4, tol=1e-3)), params, start=2)
    cosine = torch.nn.functional.cosine_similarity(loose[0].flatten(), reference[0].flatten(), dim=0)
    assert cosine > 0.999


def test_optimize_latent_with_picard_follows_sequential_sdo_and_warm_starts():
    chain = _unet_chain(steps=12)
    x = _x(chain)
    target = torch.linspace(-1, 1, 64, dtype=torch.float64).view(1, 1, 8, 8)

    def objective(x0):
        return ((x0 - target) ** 2).flatten(1).mean(1)

    kw = {"iterations": 6, "lr": 0.02, "progress": False}
    sequential = sdo.optimize_latent(chain, x, objective, **kw)
    warm = sdo.optimize_latent(chain, x, objective, picard=sdo.Picard(tol=1e-6, warm_start=True), **kw)
    cold = sdo.optimize_latent(chain, x, objective, picard=sdo.Picard(tol=1e-6), **kw)
    assert sequential.picard_runs == [] and len(warm.picard_runs) == len(cold.picard_runs) == 6
    for run in (warm, cold):
        assert max(abs(a - b) for a, b in zip(run.losses, sequential.losses, strict=True)) < 1e-6
        torch.testing.assert_close(run.latent, sequential.latent, rtol=1e-5, atol=1e-5)
    loose = [sdo.optimize_latent(chain, x, objective, picard=sdo.Picard(tol=1e-2, warm_start=w), **kw)
             for w in (True, False)]
    for with_warm_start, without in ((warm, cold), loose):
        w, c = ([s for s, _ in r.picard_runs] for r in (with_warm_start, without))
        assert w[0] == c[0] and max(w[1:]) < min(c[1:])  # the first run is cold in both
    default = sdo.optimize_latent(chain, x, objective, picard=True, **kw)  # tol 1e-3, warm-started
    assert default.losses[-1] < default.losses[0] and len(default.picard_runs) == 6
    with torch.no_grad():  # the final sample is the sequential one, whatever the tolerance
        torch.testing.assert_close(default.sample, sdo.sample(chain, default.latent), rtol=0, atol=0)


def test_picard_options_never_change_while_runs_warm_start():
    """The options are frozen; optimize_latent carries the warm start (the last trajectory) in its own loop."""
    import dataclasses

    picard = sdo.Picard(tol=1e-6, warm_start=True)
    chain = _unet_chain(steps=12)
    before = dataclasses.asdict(picard)
    sdo.optimize_latent(chain, _x(chain), lambda x0: (x0**2).flatten(1).mean(1), picard=picard, iterations=3,
                        lr=0.02, progress=False)
    assert dataclasses.asdict(picard) == before and picard.init is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        picard.init = []


def test_errors():
    chain = _unet_chain()
    x = _x(chain)
    with pytest.raises(ValueError, match="window"):
        sdo.picard_sample(chain, x, window=0)
    with pytest.raises(ValueError, match="tol"):
        sdo.Picard(tol=-1)
    with pytest.raises(ValueError, match="init must hold"):
        sdo.picard_sample(chain, x, init=[x, x])
    with pytest.raises(ValueError, match="shape of x"):
        sdo.picard_sample(chain, x, init=[x[:1]] * (len(chain) + 1))
    with pytest.raises(ValueError, match="start=10 is out of range"):
        sdo.picard_sample(chain, x, start=10)
    with pytest.raises(TypeError, match="picard must be"):
        sdo.Shortcut(picard="yes")
    with pytest.raises(ValueError, match="strategy='sdo'"):
        sdo.optimize_latent(chain, x, lambda x0: x0.sum(), strategy="full", picard=True, progress=False)
