"""Picard sampling (sdo.picard_sample, ParaDiGMS): its fixed point is the sequential sample (Prop. 4.1), exact with
tol = 0 and enough sweeps, stochastic solvers included; a converged trajectory as warm start needs one sweep."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel

import sdo
from sdo.picard import picard_sample


def _chain(eta=0.0, steps=10, guided=False):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4, num_class_embeds=3).double().eval().requires_grad_(False)
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    cond = {"class_labels": torch.tensor([0, 1, 2])}
    extra = dict(uncond={"class_labels": torch.tensor([2])}, guidance_scale=2.0) if guided else {}
    return sdo.Chain.from_diffusers(unet, scheduler, steps, cond=cond, eta=eta, **extra)


@pytest.mark.parametrize("eta,window,guided", [(0.0, None, False), (0.0, 3, True), (1.0, 4, False)])
def test_picard_equals_sequential_sampling(eta, window, guided):
    chain = _chain(eta, guided=guided)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = sdo.sample(chain, x, generator=torch.Generator().manual_seed(2))
    exact = picard_sample(chain, x, window=window, tol=0.0, generator=torch.Generator().manual_seed(2))
    assert exact.converged and exact.sweeps <= len(chain)
    torch.testing.assert_close(exact.sample, reference, rtol=1e-10, atol=1e-10)
    loose = picard_sample(chain, x, window=window, tol=1e-3, generator=torch.Generator().manual_seed(2))
    assert loose.converged and loose.sweeps <= exact.sweeps
    assert (loose.sample - reference).abs().max() < 1e-2
    assert len(chain) <= loose.calls <= loose.sweeps * (window or len(chain))  # every step at least once


def test_warm_start_from_the_fixed_point_takes_one_sweep():
    chain = _chain()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    first = picard_sample(chain, x, tol=1e-6)
    again = picard_sample(chain, x, tol=1e-6, init=first.trajectory)
    assert first.sweeps > 1 and again.sweeps == 1 and again.calls == len(chain)
    torch.testing.assert_close(again.sample, first.sample, rtol=1e-8, atol=1e-8)


def test_errors():
    chain = _chain()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="window"):
        picard_sample(chain, x, window=0)
    with pytest.raises(ValueError, match="init must hold"):
        picard_sample(chain, x, init=[x, x])
    multistep = sdo.Chain.from_diffusers(chain.denoiser.model, DPMSolverMultistepScheduler(), 10,
                                         cond=chain.denoiser.cond)
    with pytest.raises(ValueError, match="one-step updates"):
        picard_sample(multistep, x)
