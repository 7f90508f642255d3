"""Pure solvers against the diffusers schedulers they are built from."""

import copy

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from helpers import CASE_IDS, SCHEDULER_CASES, TinyNet, reference_loop

import sdo


def _latent(dtype, seed=1, shape=(2, 2, 5, 5)):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps", [3, 12])
@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=CASE_IDS)
def test_sample_equals_scheduler_loop(case, steps, dtype):
    _, make, chain_kw, step_kw = case
    model = TinyNet().to(dtype)
    chain = sdo.Chain.from_diffusers(model, make(), steps, **chain_kw)
    x = _latent(dtype) * chain.init_noise_sigma
    with torch.no_grad():
        ours = sdo.sample(chain, x, generator=torch.Generator().manual_seed(7))
        ref = reference_loop(model, make(), steps, x, generator=torch.Generator().manual_seed(7), step_kwargs=step_kw)
    assert ours.dtype == dtype
    # equal up to the float32 round-off of the schedulers' coefficient tables
    torch.testing.assert_close(ours, ref, rtol=5e-6, atol=5e-6 * ref.abs().max().item())


@pytest.mark.parametrize("case", SCHEDULER_CASES, ids=CASE_IDS)
def test_runs_and_reruns_are_bit_identical(case):
    _, make, chain_kw, _ = case
    chain = sdo.Chain.from_diffusers(TinyNet().double(), make(), 6, **chain_kw)
    x = _latent(torch.float64)
    with torch.no_grad():
        first = sdo.sample(chain, x, generator=torch.Generator().manual_seed(3))
        second = sdo.sample(chain, x, generator=torch.Generator().manual_seed(3))
        assert torch.equal(first, second)
        # re-running any single step from the same (i, x, state) gives the same result
        state = chain.init_state(x, torch.Generator().manual_seed(3))
        xi = x
        for i in range(len(chain)):
            a, state_a = chain.step(i, xi, state)
            b, _ = chain.step(i, xi, state)
            assert torch.equal(a, b)
            xi, state = a, state_a
        assert torch.equal(xi, first)


@pytest.mark.parametrize("case", [c for c in SCHEDULER_CASES
                                  if c[0] in ("ddim-eta", "ddpm", "lcm", "flow-euler-stochastic")], ids=lambda c: c[0])
def test_stochastic_solvers_follow_the_seed(case):
    _, make, chain_kw, _ = case
    chain = sdo.Chain.from_diffusers(TinyNet().double(), make(), 5, **chain_kw)
    x = _latent(torch.float64)
    with torch.no_grad():
        a = sdo.sample(chain, x, generator=torch.Generator().manual_seed(1))
        b = sdo.sample(chain, x, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, b)


# multistep history does not cross a split (a run starting at k is first order there, like a scheduler loop
# started at k): that case is test_dpm_start_matches_begin_index
@pytest.mark.parametrize("case", [c for c in SCHEDULER_CASES if not c[0].startswith("dpm2")], ids=lambda c: c[0])
def test_split_run_equals_whole_run(case):
    """Running steps 0..k-1 then k..N-1 (start/stop) equals one run, noise included."""
    _, make, chain_kw, _ = case
    chain = sdo.Chain.from_diffusers(TinyNet().double(), make(), 6, **chain_kw)
    x = _latent(torch.float64)
    with torch.no_grad():
        whole = sdo.sample(chain, x, generator=torch.Generator().manual_seed(4))
        mid = sdo.sample(chain, x, stop=3, generator=torch.Generator().manual_seed(4))
        rest = sdo.sample(chain, mid, start=3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(whole, rest)


def test_dpm_start_matches_begin_index():
    """A run starting at step k is first order there, like a scheduler loop started with set_begin_index(k)."""
    model = TinyNet()
    chain = sdo.Chain.from_diffusers(model, DPMSolverMultistepScheduler(), 10)
    x = _latent(torch.float32)
    with torch.no_grad():
        ours = sdo.sample(chain, x, start=4)
        ref = reference_loop(model, DPMSolverMultistepScheduler(), 10, x, start=4)
    torch.testing.assert_close(ours, ref, rtol=5e-6, atol=5e-6)


def test_users_scheduler_is_not_modified():
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(7)
    before = copy.deepcopy(scheduler.timesteps)
    chain = sdo.Chain.from_diffusers(TinyNet(), scheduler, 25)
    with torch.no_grad():
        sdo.sample(chain, _latent(torch.float32))
    assert torch.equal(scheduler.timesteps, before) and scheduler.step_index is None
    assert len(chain) == 25 and len(chain.timesteps) == 25


def test_already_set_scheduler_is_used_as_is():
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(9)
    chain = sdo.Chain.from_diffusers(TinyNet(), scheduler, None)
    assert torch.equal(chain.timesteps, scheduler.timesteps)
    with pytest.raises(ValueError, match="set_timesteps"):
        sdo.Chain.from_diffusers(TinyNet(), DDIMScheduler(), None)


@pytest.mark.parametrize("scheduler", [PNDMScheduler(), UniPCMultistepScheduler(), EulerAncestralDiscreteScheduler()])
def test_unsupported_scheduler_names_the_supported_ones(scheduler):
    with pytest.raises(ValueError, match="DDIMScheduler.*LCMScheduler"):
        sdo.Chain.from_diffusers(TinyNet(), scheduler, 10)


@pytest.mark.parametrize(
    "scheduler, match",
    [
        (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
        (DPMSolverMultistepScheduler(solver_order=3), "solver_order"),
        (DDIMScheduler(thresholding=True, clip_sample=False), "thresholding"),
        (DPMSolverMultistepScheduler(prediction_type="flow_prediction"), "flow"),
    ],
)
def test_unsupported_configs_raise(scheduler, match):
    with pytest.raises(ValueError, match=match):
        sdo.Chain.from_diffusers(TinyNet(), scheduler, 10)


def test_eta_only_for_ddim_and_step_count_checked():
    with pytest.raises(ValueError, match="eta"):
        sdo.Chain.from_diffusers(TinyNet(), LCMScheduler(), 4, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        sdo.Chain.from_diffusers(TinyNet(), DDIMScheduler(clip_sample=False), 4, eta=-1.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sdo.Chain.from_diffusers(TinyNet(), DDIMScheduler(clip_sample=False), 0)


def test_clip_sample_warns_and_is_applied():
    with pytest.warns(UserWarning, match="clip_sample=True"):
        chain = sdo.Chain.from_diffusers(TinyNet(), DDIMScheduler(clip_sample=True), 4)
    x = _latent(torch.float32) * 10
    with torch.no_grad():
        ref = reference_loop(TinyNet(), DDIMScheduler(clip_sample=True), 4, x)
        torch.testing.assert_close(sdo.sample(chain, x), ref, rtol=5e-6, atol=5e-6)


def test_step_index_out_of_range():
    chain = sdo.Chain.from_diffusers(TinyNet(), DDIMScheduler(clip_sample=False), 4)
    x = _latent(torch.float32)
    with pytest.raises(IndexError, match="out of range"):
        chain.step(4, x, chain.init_state(x))


def test_stochastic_step_without_noise_in_state_raises():
    chain = sdo.Chain.from_diffusers(TinyNet(), LCMScheduler(), 4)
    x = _latent(torch.float32)
    with pytest.raises(ValueError, match="init_state"):
        chain.step(0, x, sdo.SolverState())


@pytest.mark.parametrize("flux_sigmas", [False, True])
def test_flow_schedule_with_dynamic_shift_and_given_sigmas_equals_the_scheduler(flux_sigmas):
    """FLUX's schedule: a FlowMatchEuler scheduler that shifts by the image size (``use_dynamic_shifting``, mu)
    and, as FluxPipeline passes them, sigmas linspace(1, 1/N, N): the solver equals the scheduler's own loop set up
    with the same arguments; without mu it is a clear error naming it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    def make():
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift=3.0)

    steps, mu = 5, 0.81
    sigmas = [1.0 - i * (1.0 - 1.0 / steps) / (steps - 1) for i in range(steps)] if flux_sigmas else None
    model = TinyNet().double()
    chain = sdo.Chain.from_diffusers(model, make(), steps, mu=mu, sigmas=sigmas)
    x = _latent(torch.float64)
    with torch.no_grad():
        ours = sdo.sample(chain, x)
        scheduler = make()
        scheduler.set_timesteps(steps, sigmas=sigmas, mu=mu)
        ref = x
        for t in scheduler.timesteps:
            ref = scheduler.step(model(ref, t.reshape(1).expand(ref.shape[0])), t, ref).prev_sample
    torch.testing.assert_close(ours, ref, rtol=5e-6, atol=5e-6 * ref.abs().max().item())
    assert not torch.allclose(ours, sdo.sample(sdo.Chain.from_diffusers(model, make(), steps, mu=0.0), x))
    with pytest.raises(sdo.UsageError, match="use_dynamic_shifting.*pass mu"):
        sdo.Chain.from_diffusers(model, make(), steps)
    with pytest.raises(sdo.UsageError, match="mu and sigmas apply to FlowMatchEulerDiscreteScheduler only"):
        sdo.Chain.from_diffusers(model, DDIMScheduler(), steps, mu=mu)
    with pytest.raises(sdo.UsageError, match="3 sigmas for 5 steps"):
        sdo.Chain.from_diffusers(model, make(), steps, mu=mu, sigmas=[1.0, 0.5, 0.2])
