"""Gradient strategies: exact ones against Full, approximate ones against hand-written reference loops, and
SDO's latent gradient against Eq. 19 in closed form on analytic Gaussian-data models (all in float64)."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from helpers import CASE_IDS, SCHEDULER_CASES, GaussianEps, GaussianFlow, TinyNet, alphas_cumprod, reference_loop

import sdo

F64 = {"rtol": 1e-9, "atol": 1e-12}


def _x(shape=(2, 2, 4, 4), seed=1):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _weights(shape=(2, 2, 4, 4)):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(99))


def _objective(x0):
    return (torch.sin(x0) * _weights(x0.shape)).sum() + 0.1 * (x0**2).sum()


def _grads(chain, x, strategy, *, params=(), start=0, seed=5):
    """Gradient of the objective w.r.t. the latent and ``params`` through ``sample``."""
    x = x.clone().requires_grad_(True)
    out = sdo.sample(chain, x, strategy=strategy, start=start, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(_objective(out), [x, *params])


def _ref_grads(model, make, steps, x, *, grad_steps, start=0, step_kw=None, seed=5):
    x = x.clone().requires_grad_(True)
    out = reference_loop(
        model, make(), steps, x, grad_steps=grad_steps, start=start,
        generator=torch.Generator().manual_seed(seed), step_kwargs=step_kw,
    )
    return torch.autograd.grad(_objective(out), [x, *model.parameters()])


@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=CASE_IDS)
def test_checkpoint_equals_full(case):
    """Exact: what breaks with stateful schedulers (re-running a step) works with pure solvers."""
    _, make, chain_kw, _ = case
    model = TinyNet().double()
    chain = sdo.Chain.from_diffusers(model, make(), 5, **chain_kw)
    x = _x() * chain.init_noise_sigma
    full = _grads(chain, x, "full", params=list(model.parameters()))
    ckpt = _grads(chain, x, sdo.Checkpoint(), params=list(model.parameters()))
    for a, b in zip(full, ckpt, strict=True):
        torch.testing.assert_close(a, b, **F64)
    assert full[0].abs().sum() > 0


@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=CASE_IDS)
def test_truncated_to_all_steps_equals_full(case):
    _, make, chain_kw, _ = case
    model = TinyNet().double()
    chain = sdo.Chain.from_diffusers(model, make(), 5, **chain_kw)
    x = _x() * chain.init_noise_sigma
    full = _grads(chain, x, "full", params=list(model.parameters()))
    trunc = _grads(chain, x, sdo.Truncated(len(chain)), params=list(model.parameters()))
    for a, b in zip(full, trunc, strict=True):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=CASE_IDS)
def test_checkpointed_truncation_equals_stored(case):
    """Truncated and RandomTruncated with checkpoint=True (AlignProp's checkpointed denoiser calls): the gradient
    of the same truncation stored in memory, bit for bit in float64."""
    _, make, chain_kw, _ = case
    model = TinyNet().double()
    chain = sdo.Chain.from_diffusers(model, make(), 5, **chain_kw)
    x = _x() * chain.init_noise_sigma
    params = list(model.parameters())
    for stored, recomputed in [
        (sdo.Truncated(3), sdo.Truncated(3, checkpoint=True)),
        (sdo.RandomTruncated(1, 5, torch.Generator().manual_seed(3)),
         sdo.RandomTruncated(1, 5, torch.Generator().manual_seed(3), checkpoint=True)),
    ]:
        a, b = _grads(chain, x, stored, params=params), _grads(chain, x, recomputed, params=params)
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, **F64)
        assert sum(g.abs().sum() for g in a[1:]) > 0


def _tol(ref):
    # diffusers' DPM, Euler and FlowMatch schedulers compute in float32 internally
    return {"rtol": 2e-5, "atol": 2e-5 * max(r.abs().max().item() for r in ref)}


@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("at", [0, 2, 4])
def test_shortcut_equals_reference_loop(case, at):
    """Latent and parameter gradients of Shortcut(at) equal the paper's loop with set_grad_enabled(i == at)."""
    _, make, chain_kw, step_kw = case
    model = TinyNet().double()
    chain = sdo.Chain.from_diffusers(model, make(), 5, **chain_kw)
    x = _x() * chain.init_noise_sigma
    ours = _grads(chain, x, sdo.Shortcut(at=at), params=list(model.parameters()))
    ref = _ref_grads(model, make, 5, x, grad_steps={at}, step_kw=step_kw)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **_tol(ref))
    assert ref[0].abs().sum() > 0 and sum(r.abs().sum() for r in ref[1:]) > 0


@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=CASE_IDS)
def test_truncated_and_first_equal_reference_loops(case):
    _, make, chain_kw, step_kw = case
    model = TinyNet().double()
    chain = sdo.Chain.from_diffusers(model, make(), 6, **chain_kw)
    x = _x() * chain.init_noise_sigma
    params = list(model.parameters())
    for strategy, grad_steps in [(sdo.Truncated(2), {4, 5}), (sdo.Shortcut(), {0})]:
        ours = _grads(chain, x, strategy, params=params)
        ref = _ref_grads(model, make, 6, x, grad_steps=grad_steps, step_kw=step_kw)
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, **_tol(ref))


def test_shortcut_first_at_intermediate_start():
    """at='first' with start > 0 keeps the graph of step `start` (the latent being optimized)."""
    make = lambda: DDIMScheduler(clip_sample=False)
    model = TinyNet().double()
    chain = sdo.Chain.from_diffusers(model, make(), 8)
    x = _x()
    ours = _grads(chain, x, "sdo", params=list(model.parameters()), start=3)
    ref = _ref_grads(model, make, 8, x, grad_steps={3}, start=3)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **_tol(ref))


def test_graph_kept_only_where_the_strategy_says():
    calls = []

    def model(x, t):
        calls.append(torch.is_grad_enabled())
        return 0.5 * torch.tanh(x)

    chain = sdo.Chain.from_diffusers(model, DDIMScheduler(clip_sample=False), 7)
    x = _x().requires_grad_(True)
    expected = {
        "full": [True] * 7,
        "sdo": [True] + [False] * 6,
        "truncated": [False] * 6 + [True],
        sdo.Truncated(3): [False] * 4 + [True] * 3,
        sdo.Shortcut(at=4): [False] * 4 + [True] + [False] * 2,
    }
    for strategy, keep in expected.items():
        calls.clear()
        sdo.sample(chain, x, strategy=strategy)
        assert calls == keep, strategy
    calls.clear()
    with torch.no_grad():
        assert not sdo.sample(chain, x, strategy="full").requires_grad
    assert calls == [False] * 7


def test_random_choices_are_seeded_and_uniform():
    steps = range(2, 12)
    draws = [next(iter(sdo.Shortcut("random", generator=torch.Generator().manual_seed(s)).select(steps)))
             for s in range(3)]
    again = [next(iter(sdo.Shortcut("random", generator=torch.Generator().manual_seed(s)).select(steps)))
             for s in range(3)]
    assert draws == again
    shortcut = sdo.Shortcut("random", generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(12)
    for _ in range(3000):
        counts[next(iter(shortcut.select(steps)))] += 1
    assert counts[:2].sum() == 0 and counts[2:].min() > 230  # ~300 each, never outside the run
    truncation = sdo.RandomTruncated(2, 5, generator=torch.Generator().manual_seed(0))
    lengths = set()
    for _ in range(200):
        chosen = truncation.select(steps)
        assert list(chosen) == list(range(12 - len(chosen), 12))  # a suffix of the run, one k per trajectory
        lengths.add(len(chosen))
    assert lengths == {2, 3, 4, 5}


def test_shortcut_random_gradient_matches_the_drawn_step():
    model = TinyNet().double()
    make = lambda: DDIMScheduler(clip_sample=False)
    chain = sdo.Chain.from_diffusers(model, make(), 6)
    x = _x()
    drawn = next(iter(sdo.Shortcut("random", generator=torch.Generator().manual_seed(11)).select(range(6))))
    ours = _grads(chain, x, sdo.Shortcut("random", generator=torch.Generator().manual_seed(11)),
                  params=list(model.parameters()))
    ref = _ref_grads(model, make, 6, x, grad_steps={drawn})
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **_tol(ref))


@pytest.mark.parametrize("case", [c for c in SCHEDULER_CASES
                                  if c[0] in ("ddim", "dpm2-midpoint", "euler", "flow-euler-shift", "lcm", "ddpm")],
                         ids=lambda c: c[0])
def test_full_gradcheck(case):
    _, make, chain_kw, _ = case
    model = TinyNet(channels=1, hidden=3).double()
    chain = sdo.Chain.from_diffusers(model, make(), 3, **chain_kw)
    x = (_x((1, 1, 3, 3)) * chain.init_noise_sigma).requires_grad_(True)

    def run(latent):
        return sdo.sample(chain, latent, strategy="full", generator=torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(run, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


def _ddim_coefficients(scheduler, steps):
    """x_{i+1} = A_i x_i + B_i eps_i for DDIM with eta = 0 (Song et al., Eq. 12)."""
    ac = alphas_cumprod(scheduler)
    scheduler.set_timesteps(steps)
    stride = scheduler.config.num_train_timesteps // steps
    coef = []
    for t in scheduler.timesteps.tolist():
        a, a_prev = ac[t], (ac[t - stride] if t - stride >= 0 else 1.0)
        coef.append((t, math.sqrt(a_prev / a), math.sqrt(1 - a_prev) - math.sqrt(a_prev * (1 - a) / a)))
    return coef


@pytest.mark.parametrize("start", [0, 4])
def test_shortcut_latent_gradient_is_eq19_closed_form_ddim(start):
    """On Gaussian data the chain is affine: x0 = prod_i (A_i + B_i c_i) x + const under Full, and under SDO
    the Jacobian is (A_s + B_s c_s) prod_{i>s} A_i (the model outputs of later steps held fixed)."""
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    model = GaussianEps(alphas_cumprod(scheduler))
    steps = 10
    chain = sdo.Chain.from_diffusers(model, scheduler, steps)
    coef = _ddim_coefficients(scheduler, steps)[start:]
    x, w = _x(), _weights()

    def grad(strategy):
        latent = x.clone().requires_grad_(True)
        out = sdo.sample(chain, latent, strategy=strategy, start=start)
        return torch.autograd.grad((w * out).sum(), [latent, model.mu])

    t0, a0, b0 = coef[0]
    sdo_factor = (a0 + b0 * model.slope(t0)) * math.prod(a for _, a, _ in coef[1:])
    full_factor = math.prod(a + b * model.slope(t) for t, a, b in coef)
    gx_sdo, _ = grad("sdo")
    gx_full, _ = grad("full")
    torch.testing.assert_close(gx_sdo, sdo_factor * w, **F64)
    torch.testing.assert_close(gx_full, full_factor * w, **F64)
    assert abs(sdo_factor - full_factor) > 1e-3 * abs(full_factor)  # the two really differ

    # Eq. 20 for the parameter mu at step i': d eps_i / d mu = -c_i sqrt(a_i), carried by the later skip path
    ac = model.alphas
    for at in (start, start + 3):
        k = at - start
        t, _, b = coef[k]
        expected = b * (-model.slope(t) * math.sqrt(ac[t])) * math.prod(a for _, a, _ in coef[k + 1 :]) * w.sum().item()
        _, g_mu = grad(sdo.Shortcut(at=at))
        torch.testing.assert_close(g_mu, torch.tensor(expected, dtype=torch.float64), **F64)


def test_shortcut_latent_gradient_is_eq19_closed_form_flow():
    """The paper's own form: x_0 = x_N + sum_i dt_i u(x_i); SDO's Jacobian is I + dt_0 du/dx at the first step."""
    scheduler = FlowMatchEulerDiscreteScheduler()
    model = GaussianFlow()
    chain = sdo.Chain.from_diffusers(model, scheduler, 8)
    sigmas = chain.solver.sigmas
    slopes = [model.slope(t / 1000.0) for t in chain.timesteps.tolist()]
    x, w = _x(), _weights()
    latent = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((w * sdo.sample(chain, latent, strategy="sdo")).sum(), latent)
    torch.testing.assert_close(g, (1 + (sigmas[1] - sigmas[0]) * slopes[0]) * w, **F64)
    latent = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((w * sdo.sample(chain, latent, strategy="full")).sum(), latent)
    full = math.prod(1 + (sigmas[i + 1] - sigmas[i]) * slopes[i] for i in range(len(chain)))
    torch.testing.assert_close(g, full * w, **F64)


def test_registry():
    assert sdo.available_strategies() == ["adjoint", "checkpoint", "direct-align", "draft-lv", "drtune", "full",
                                          "random-truncated", "refl", "reversible", "sdo", "truncated"]
    assert isinstance(sdo.get_strategy("sdo", at="random"), sdo.Shortcut)
    assert sdo.get_strategy("truncated", k=3).k == 3
    s = sdo.Full()
    assert sdo.get_strategy(s) is s
    with pytest.raises(ValueError, match="available: adjoint, checkpoint"):
        sdo.get_strategy("bptt")
    with pytest.raises(ValueError):
        sdo.get_strategy(s, k=1)

    @sdo.register_strategy("test-last-only")
    class LastOnly(sdo.Strategy):
        def select(self, steps):
            return {steps.stop - 1}

    try:
        model = TinyNet().double()
        chain = sdo.Chain.from_diffusers(model, DDIMScheduler(clip_sample=False), 4)
        a = _grads(chain, _x(), "test-last-only", params=list(model.parameters()))
        b = _grads(chain, _x(), sdo.Truncated(1), params=list(model.parameters()))
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, **F64)
        with pytest.raises(ValueError, match="already registered"):
            sdo.register_strategy("full")(LastOnly)
    finally:
        sdo.gradients.base._REGISTRY.pop("test-last-only", None)


def test_strategy_argument_errors():
    with pytest.raises(ValueError):
        sdo.Truncated(0)
    with pytest.raises(ValueError):
        sdo.RandomTruncated(5, 2)
    with pytest.raises(ValueError):
        sdo.Shortcut(at="last")
    with pytest.raises(ValueError):
        sdo.Shortcut(at=-1)
    chain = sdo.Chain.from_diffusers(TinyNet().double(), DDIMScheduler(clip_sample=False), 6)
    with pytest.raises(ValueError, match="outside the steps"):
        sdo.sample(chain, _x(), strategy=sdo.Shortcut(at=1), start=3)
