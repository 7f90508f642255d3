"""Constant-memory baselines (AdjointDPM, DOODL/EDICT), one-step guidance (FreeDoM/UGD) and the gradient
diagnostics: exact ones against Full in float64, approximate ones against closed forms and measured bounds."""

import math
import statistics

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from helpers import CASE_IDS, SCHEDULER_CASES, GaussianEps, GaussianFlow, TinyNet, alphas_cumprod
from test_strategies import F64, _ddim_coefficients, _grads, _objective, _weights, _x

import sdo
from sdo.gradients.adjoint import reconstruction_error

INVERTIBLE = [c for c in SCHEDULER_CASES if c[0] in
              ("ddim", "ddim-v-trailing", "ddim-sample-pred", "dpm1-v", "euler", "euler-v-karras", "flow-euler-shift")]
INVERTIBLE_IDS = [c[0] for c in INVERTIBLE]


def _chain(case, steps=5, model=None):
    _, make, chain_kw, _ = case
    model = model or TinyNet().double()
    return model, sdo.Chain.from_diffusers(model, make(), steps, **chain_kw)


# ---------------------------------------------------------------- solver inversion and noise levels


@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=CASE_IDS)
def test_invert_undoes_step(case):
    _, chain = _chain(case)
    x = _x() * chain.init_noise_sigma
    state = chain.init_state(x, torch.Generator().manual_seed(0))
    if not chain.solver.invertible:
        with pytest.raises(ValueError, match="cannot be inverted"):
            chain.solver.invert(0, x, x, state)
        return
    for i in range(len(chain) - 1):  # the last step of x0-prediction DDIM discards x (tested below)
        out = chain.denoise(i, x)
        x_next, _ = chain.update(i, x, out, state)
        torch.testing.assert_close(chain.solver.invert(i, x_next, out, state), x, rtol=1e-10, atol=1e-10)
        x = x_next


def test_invert_refuses_a_step_that_discards_x():
    chain = sdo.Chain.from_diffusers(TinyNet().double(), DDIMScheduler(clip_sample=False, prediction_type="sample"), 4)
    x = _x()
    with pytest.raises(ValueError, match="does not depend on x"):
        chain.solver.invert(3, x, x, chain.init_state(x))


@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=CASE_IDS)
def test_levels_chain_up_and_match_the_noise_schedule(case):
    """Each step's output level is the next step's input level (DDIM: the level of t - T // N, diffusers'
    rule, which is not the next timestep under trailing spacing), and the first is the prior's."""
    _, chain = _chain(case, steps=6)
    solver = chain.solver
    for i in range(len(chain) - 1):
        if case[0].startswith("ddim"):
            t_prev = int(chain.timesteps[i]) - 1000 // 6
            assert solver.levels(i)[1][0] == pytest.approx(math.sqrt(solver.alphas_cumprod[t_prev]), rel=1e-12)
        else:
            assert solver.levels(i)[1] == pytest.approx(solver.levels(i + 1)[0], rel=1e-12)
    (alpha, sigma), _ = solver.levels(0)
    if not case[0].startswith(("euler", "flow")):  # variance-preserving: alpha^2 + sigma^2 = 1
        assert math.hypot(alpha, sigma) == pytest.approx(1.0, rel=1e-9)
    assert sigma > 0.9 * alpha  # the first step starts from (nearly) pure noise
    _, (alpha_end, sigma_end) = solver.levels(len(chain) - 1)
    assert sigma_end < 0.1 * alpha_end  # the last step ends (nearly) at the data


@pytest.mark.parametrize("case", [c for c in SCHEDULER_CASES if c[0].startswith(("ddim", "ddpm", "lcm", "euler"))],
                         ids=[c[0] for c in SCHEDULER_CASES if c[0].startswith(("ddim", "ddpm", "lcm", "euler"))])
def test_denoised_is_the_schedulers_x0_prediction(case):
    _, make, chain_kw, step_kw = case
    model = TinyNet().double()
    scheduler = make()
    chain = sdo.Chain.from_diffusers(model, scheduler, 4, **chain_kw)
    scheduler.set_timesteps(4)
    x = _x() * chain.init_noise_sigma
    t = scheduler.timesteps[0]
    model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
    out = model(model_in, t.reshape(1).expand(2))
    result = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(0), **step_kw)
    expected = getattr(result, "denoised", None)
    expected = result.pred_original_sample if expected is None else expected
    torch.testing.assert_close(chain.solver.denoised(0, x, out), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- AdjointDPM


@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=CASE_IDS)
def test_exact_adjoint_equals_full(case):
    """The discrete adjoint (stored states, one step recomputed at a time) is backpropagation, for every solver:
    multistep history and per-step noise included."""
    model, chain = _chain(case)
    x = _x() * chain.init_noise_sigma
    params = list(model.parameters())
    full = _grads(chain, x, "full", params=params)
    adjoint = _grads(chain, x, sdo.Adjoint(exact=True), params=params)
    for a, b in zip(full, adjoint, strict=True):
        torch.testing.assert_close(b, a, **F64)
    for start, stop in ((2, None), (1, 4)):  # partial runs
        grads = []
        for strategy in ("full", sdo.Adjoint(exact=True)):
            latent = x.clone().requires_grad_(True)
            out = sdo.sample(chain, latent, strategy=strategy, start=start, stop=stop,
                             generator=torch.Generator().manual_seed(5))
            grads.append(torch.autograd.grad(_objective(out), latent)[0])
        torch.testing.assert_close(grads[1], grads[0], **F64)


def test_adjoint_params_are_explicit():
    """``params`` restricts which tensors the backward pass computes gradients for (torchdiffeq's adjoint_params)."""
    model, chain = _chain(SCHEDULER_CASES[0])
    x = _x()
    weight = model.conv1.weight
    full = _grads(chain, x, "full", params=[weight])
    got = _grads(chain, x, sdo.Adjoint(exact=True, params=[weight]), params=[weight])
    torch.testing.assert_close(got[1], full[1], **F64)
    latent = x.clone().requires_grad_(True)
    out = sdo.sample(chain, latent, strategy=sdo.Adjoint(params=()))
    with pytest.raises(RuntimeError, match="not have been used"):
        torch.autograd.grad(_objective(out), [weight])


def test_constant_memory_strategies_reach_a_conditioning_tensor_by_default():
    """A prompt-embedding-like tensor in ``cond`` gets the same gradient as under Full, without naming it."""

    class Conditioned(TinyNet):
        def forward(self, x, timestep, shift):
            return super().forward(x, timestep) + shift

    model = Conditioned().double()
    shift = torch.full((1, 2, 1, 1), 0.2, dtype=torch.float64, requires_grad=True)
    chain = sdo.Chain.from_diffusers(model, DDIMScheduler(clip_sample=False), 4, cond={"shift": shift})
    ref = _grads(chain, _x(), "full", params=[shift])[1]
    torch.testing.assert_close(_grads(chain, _x(), sdo.Adjoint(exact=True), params=[shift])[1], ref, **F64)
    for strategy in (sdo.Adjoint(), sdo.Reversible(p=1.0)):  # approximate, and another chain: same direction
        got = _grads(chain, _x(), strategy, params=[shift])[1]
        assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.9, strategy


@pytest.mark.parametrize("flow", [False, True], ids=["ddim-gaussian", "flow-gaussian"])
def test_continuous_adjoint_is_exact_on_linear_models(flow):
    """On Gaussian data the denoiser is affine in x, so its Jacobian is the same at the rebuilt states as at the
    sampled ones: the continuous adjoint's gradients (latent and the model's mean parameter) equal Full's even
    though the rebuilt states are off."""
    scheduler = FlowMatchEulerDiscreteScheduler() if flow else DDIMScheduler(clip_sample=False)
    model = GaussianFlow() if flow else GaussianEps(alphas_cumprod(scheduler))
    chain = sdo.Chain.from_diffusers(model, scheduler, 8)
    x = _x()
    full = _grads(chain, x, "full", params=[model.mu])
    adjoint = _grads(chain, x, "adjoint", params=[model.mu])
    for a, b in zip(full, adjoint, strict=True):
        torch.testing.assert_close(b, a, **F64)
    assert max(reconstruction_error(chain, x)) > 1e-6  # the states it rebuilt were not the sampled ones


def test_continuous_adjoint_reconstruction_error_shrinks_with_steps():
    """The error of rebuilding x_T by the backward ODE is first order in the step size on the analytic model."""
    scheduler = DDIMScheduler(clip_sample=False)
    model = GaussianEps(alphas_cumprod(scheduler))
    errors = []
    for n in (10, 20, 40):
        chain = sdo.Chain.from_diffusers(model, scheduler, n)
        errors.append(reconstruction_error(chain, _x())[0])
    assert errors[0] > errors[1] > errors[2] > 0
    assert errors[1] / errors[2] > 1.5


def test_continuous_adjoint_on_the_embedded_model():
    """AdjointDPM's gradient on the digits DDPM at N = 50 against Full's, in the benchmark's setting (docs/
    benchmarks.md: 4 latents, raise the log-probability of the next digit): cosine > 0.99. The backward ODE
    amplifies the reconstruction error of this sharp pixel model (x_T is rebuilt with ~60% relative error), so
    agreement depends on the sample; the exact adjoint is backpropagation."""
    from sdo.cli.bench import BenchConfig, build

    setup = build(BenchConfig(steps=50, batch=4, seed=0), 50)
    fid = sdo.gradient_fidelity(setup.chain, setup.x, setup.objective,
                                {"adjoint": "adjoint", "exact": sdo.Adjoint(exact=True)})
    assert fid["exact"].cosine > 1 - 1e-5 and abs(fid["exact"].norm_ratio - 1) < 1e-4
    assert fid["adjoint"].cosine > 0.99 and min(fid["adjoint"].item_cosine) > 0.95, fid["adjoint"]
    assert 0.9 < fid["adjoint"].norm_ratio < 1.1
    assert reconstruction_error(setup.chain, setup.x)[0] > 0.3  # what limits it


def test_continuous_adjoint_agreement_depends_on_the_sample():
    """Six other latents and targets, in float64: per-item cosines 0.87-0.998 (measured; ``pytest -s -k
    depends_on_the_sample`` prints them), not near Full's for every sample as the exact adjoint is."""
    from sdo.embedded import load_digits

    models = load_digits(dtype=torch.float64)
    labels = torch.tensor([3, 5, 0, 1, 2, 8])
    chain = sdo.Chain.from_diffusers(models.unet, models.scheduler, 50, cond={"class_labels": labels})
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def objective(x0):
        return models.classifier(x0).log_softmax(-1)[:, 7]

    cos = sdo.gradient_fidelity(chain, x, objective, ["adjoint"])["adjoint"].item_cosine
    print("continuous adjoint, per-item cosine with Full:", [round(c, 3) for c in cos])  # quoted (pytest -s)
    assert statistics.median(cos) > 0.95 and max(cos) > 0.99 and min(cos) > 0.8, cos


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DPMSolverMultistepScheduler(), "solver_order=1"),
        (lambda: DDIMScheduler(clip_sample=True), "clip_sample"),
        (lambda: SCHEDULER_CASES[4][1](), "adds noise"),
    ],
    ids=["dpm2", "clipped", "ddpm"],
)
def test_constant_memory_strategies_refuse_what_they_cannot_invert(make, message):
    with pytest.warns(UserWarning) if "clip" in message else _nothing():
        chain = sdo.Chain.from_diffusers(TinyNet().double(), make(), 4)
    for strategy in (sdo.Adjoint(), sdo.Reversible()):
        with pytest.raises(ValueError, match=message):
            _grads(chain, _x(), strategy)
    _grads(chain, _x(), sdo.Adjoint(exact=True))  # always possible


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_constant_memory_strategies_sample_like_their_chains_without_grad():
    _, chain = _chain(SCHEDULER_CASES[0])
    x = _x()
    with torch.no_grad():
        plain = sdo.sample(chain, x)
        torch.testing.assert_close(sdo.sample(chain, x, strategy="adjoint"), plain, **F64)
        torch.testing.assert_close(sdo.sample(chain, x, strategy=sdo.Adjoint(exact=True)), plain, **F64)
        rev = sdo.sample(chain, x, strategy="reversible")
    assert not torch.allclose(rev, plain)  # EDICT is a different (coupled) sampler
    torch.testing.assert_close(sdo.sample(chain, x, strategy=sdo.Reversible(p=1.0)), _edict_ddim(chain, x, 1.0), **F64)


# ---------------------------------------------------------------- DOODL / EDICT


def _edict_ddim(chain, x, p):
    """EDICT as written in Wallace et al. (Eqs. 14-15) for DDIM with eps-prediction, from alpha-bar directly:
    a_t = sqrt(abar_prev / abar_t), b_t = sqrt(1 - abar_prev) - sqrt(abar_prev (1 - abar_t) / abar_t)."""
    model = chain.denoiser.model
    y = x
    for i, t in enumerate(chain.timesteps.tolist()):
        (alpha, _), (alpha_prev, _) = chain.solver.levels(i)
        abar, abar_prev = alpha**2, alpha_prev**2
        a = math.sqrt(abar_prev / abar)
        b = math.sqrt(1 - abar_prev) - math.sqrt(abar_prev * (1 - abar) / abar)
        tt = torch.full((x.shape[0],), t)
        x_inter = a * x + b * model(y, tt)
        y_inter = a * y + b * model(x_inter, tt)
        x = p * x_inter + (1 - p) * y_inter
        y = p * y_inter + (1 - p) * x
    return x


def test_reversible_equals_backprop_through_the_papers_edict_chain():
    model, chain = _chain(SCHEDULER_CASES[0], steps=6)
    x, params = _x(), list(model.parameters())
    latent = x.clone().requires_grad_(True)
    ref = torch.autograd.grad(_objective(_edict_ddim(chain, latent, 0.93)), [latent, *params])
    got = _grads(chain, x, "reversible", params=params)
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", INVERTIBLE, ids=INVERTIBLE_IDS)
def test_reversible_equals_backprop_through_edict_steps(case):
    """For every invertible solver: the inversion-based backward pass equals autograd through ``edict_step``."""
    model, chain = _chain(case, steps=4)
    x, params = _x() * chain.init_noise_sigma, list(model.parameters())
    latent = x.clone().requires_grad_(True)
    a, b, state = latent, latent, chain.init_state(latent)
    for i in range(len(chain)):
        a, b = sdo.edict_step(chain, i, a, b, state, p=0.9)
    ref = torch.autograd.grad(_objective(a), [latent, *params])
    got = _grads(chain, x, sdo.Reversible(p=0.9), params=params)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)


def test_reversible_gradcheck_three_steps():
    """Finite differences on a 3-step chain (float64): gradcheck for the latent, and a central difference along
    a random direction for a weight."""
    model, chain = _chain(SCHEDULER_CASES[0], steps=3)
    x = _x((1, 2, 3, 3)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lat: sdo.sample(chain, lat, strategy="reversible"), (x,), eps=1e-6,
                                    atol=1e-6)

    weight = model.conv2.weight
    direction = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def loss():
        return _objective(sdo.sample(chain, x.detach(), strategy=sdo.Reversible(params=[weight])))

    (grad,) = torch.autograd.grad(loss(), weight)
    eps, base = 1e-6, weight.detach().clone()
    values = []
    with torch.no_grad():
        for sign in (1, -1):
            weight.copy_(base + sign * eps * direction)
            values.append(float(loss()))
        weight.copy_(base)
    assert (grad * direction).sum().item() == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-6)


def test_reversible_rejects_bad_mixing():
    with pytest.raises(ValueError, match="p must be"):
        sdo.Reversible(p=0.3)


# ---------------------------------------------------------------- FreeDoM / UGD guidance


def _target_objective(x0):
    return ((x0 - 1.5) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("flow", [False, True], ids=["ddim", "flow"])
def test_guidance_lowers_the_objective_on_an_analytic_model(flow):
    scheduler = FlowMatchEulerDiscreteScheduler() if flow else DDIMScheduler(clip_sample=False)
    model = GaussianFlow() if flow else GaussianEps(alphas_cumprod(scheduler))
    chain = sdo.Chain.from_diffusers(model, scheduler, 20)
    x = _x((8, 2, 4, 4))
    with torch.no_grad():
        plain = _target_objective(sdo.sample(chain, x)).mean()
    guided = sdo.guided_sample(chain, x, sdo.Guidance(_target_objective, scale=0.5))
    travelled = sdo.guided_sample(
        chain, x, sdo.Guidance(_target_objective, scale=0.5, time_travel=3),
        generator=torch.Generator().manual_seed(0),
    )
    loss_guided, loss_travel = _target_objective(guided).mean(), _target_objective(travelled).mean()
    assert not guided.requires_grad
    assert loss_guided < 0.8 * plain, (float(loss_guided), float(plain))
    assert loss_travel < loss_guided, (float(loss_travel), float(loss_guided))


def test_guidance_scale_zero_is_plain_sampling_and_steps_are_selectable():
    _, chain = _chain(SCHEDULER_CASES[0], steps=6)
    x = _x()
    with torch.no_grad():
        plain = sdo.sample(chain, x)
    torch.testing.assert_close(sdo.guided_sample(chain, x, sdo.Guidance(_target_objective, scale=0.0)), plain, **F64)
    late = sdo.guided_sample(chain, x, sdo.Guidance(_target_objective, scale=0.5, steps=range(4, 6)))
    early = sdo.guided_sample(chain, x, sdo.Guidance(_target_objective, scale=0.5, steps=range(2)))
    assert not torch.allclose(late, early)
    by_step = sdo.guided_sample(chain, x, sdo.Guidance(_target_objective, scale=lambda i: 0.5 if i >= 4 else 0.0))
    torch.testing.assert_close(by_step, late, **F64)


def test_guidance_errors():
    _, chain = _chain(SCHEDULER_CASES[0])
    x = _x()
    with pytest.raises(ValueError, match="takes no strategy"), pytest.warns(DeprecationWarning):
        sdo.sample(chain, x, strategy="sdo", guidance=sdo.Guidance(_target_objective))
    with pytest.warns(DeprecationWarning, match="guided_sample"):  # the old spelling, for one release
        old = sdo.sample(chain, x, guidance=sdo.Guidance(_target_objective, scale=0.5))
    torch.testing.assert_close(old, sdo.guided_sample(chain, x, sdo.Guidance(_target_objective, scale=0.5)), **F64)
    with pytest.raises(ValueError, match="does not depend"):
        sdo.guided_sample(chain, x, sdo.Guidance(lambda x0: torch.ones(x0.shape[0])))
    with pytest.raises(ValueError, match="time_travel"):
        sdo.Guidance(_target_objective, time_travel=0)


# ---------------------------------------------------------------- diagnostics


def test_gradient_fidelity_matches_the_closed_form():
    """On the Gaussian DDIM chain both gradients are multiples of w (test_strategies' Eq. 19 closed form), so
    SDO's cosine is exactly 1 and its norm ratio is the ratio of the two factors."""
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    model = GaussianEps(alphas_cumprod(scheduler))
    chain = sdo.Chain.from_diffusers(model, scheduler, 10)
    coef = _ddim_coefficients(scheduler, 10)
    w = _weights()

    def objective(x0):
        return (w * x0).flatten(1).sum(1)

    fid = sdo.gradient_fidelity(chain, _x(), objective, ["sdo", "checkpoint", sdo.Adjoint(exact=True)])
    t0, a0, b0 = coef[0]
    sdo_factor = (a0 + b0 * model.slope(t0)) * math.prod(a for _, a, _ in coef[1:])
    full_factor = math.prod(a + b * model.slope(t) for t, a, b in coef)
    assert fid["sdo"].cosine == pytest.approx(math.copysign(1, sdo_factor * full_factor), abs=1e-12)
    assert fid["sdo"].norm_ratio == pytest.approx(abs(sdo_factor / full_factor), rel=1e-9)
    assert fid["checkpoint"].cosine == pytest.approx(1, abs=1e-12)
    assert fid["Adjoint(exact=True)"].norm_ratio == pytest.approx(1, rel=1e-9)
    assert len(fid["sdo"].item_cosine) == 2


def test_gradient_norm_by_depth_matches_the_closed_form():
    """Fig. 11a on the Gaussian chain: Full's norm at depth d is |w| prod of the last d steps' full factors,
    SDO's the first of them times the skip factors."""
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    model = GaussianEps(alphas_cumprod(scheduler))
    chain = sdo.Chain.from_diffusers(model, scheduler, 10)
    coef = _ddim_coefficients(scheduler, 10)
    w = _weights()
    norms = sdo.gradient_norm_by_depth(chain, _x(), lambda x0: (w * x0).flatten(1).sum(1), [1, 4, 10])
    w_norm = float(w.flatten(1).norm(dim=1).mean())
    for j, d in enumerate([1, 4, 10]):
        tail = coef[10 - d :]
        full = math.prod(a + b * model.slope(t) for t, a, b in tail)
        (t0, a0, b0), rest = tail[0], tail[1:]
        short = (a0 + b0 * model.slope(t0)) * math.prod(a for _, a, _ in rest)
        assert norms["full"][j] == pytest.approx(abs(full) * w_norm, rel=1e-9)
        assert norms["sdo"][j] == pytest.approx(abs(short) * w_norm, rel=1e-9)
    with pytest.raises(ValueError, match="depths"):
        sdo.gradient_norm_by_depth(chain, _x(), _target_objective, [0])


def test_registry_lists_the_baselines():
    names = sdo.available_strategies()
    assert {"adjoint", "reversible"} <= set(names)
    assert sdo.get_strategy("adjoint", exact=True).exact
    assert sdo.get_strategy("reversible", p=0.9).p == 0.9
    assert "params=<1 tensors>" in repr(sdo.Adjoint(params=[torch.zeros(1)]))
