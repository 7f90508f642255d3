import torch
from diffusers import DDIMScheduler
from helpers import TinyNet

import sdo
from sdo.measure import profile as bench


def test_peak_memory_sees_a_large_temporary_allocation():
    def job():
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, freed on return
        return big.sum()

    peak = bench.peak_memory(job)
    assert 48 * 2**20 < peak < 160 * 2**20


def test_saved_tensor_bytes_grow_with_the_graph_and_time_jobs_counts_rounds():
    model = TinyNet()
    chain = sdo.Chain.from_diffusers(model, DDIMScheduler(clip_sample=False), 6)
    x = torch.randn(2, 2, 8, 8)
    jobs = {name: bench.latent_gradient(chain, x, name, lambda x0: x0.pow(2).sum()) for name in ("full", "sdo")}
    params = tuple(model.parameters())
    full, short = (bench.saved_tensor_bytes(jobs[n], exclude=params) for n in ("full", "sdo"))
    assert full > 3 * short > 0
    times = bench.time_jobs({**jobs, "nograd": bench.latent_gradient(chain, x, None, None)}, repeats=2, progress=False)
    assert {k: len(v) for k, v in times.items()} == {"full": 2, "sdo": 2, "nograd": 2}
    assert jobs["full"]().shape == x.shape


def test_call_counts_follow_each_strategys_algorithm():
    """Denoiser work per gradient, counted by hooks: what each method's cost model says (N = 4)."""
    model = TinyNet()
    chain = sdo.Chain.from_diffusers(model, DDIMScheduler(clip_sample=False), 4)
    x = torch.randn(2, 2, 6, 6)
    expected = {  # (forward calls, backward passes)
        "full": (4, 4), "checkpoint": (8, 4), "sdo": (4, 1), "truncated": (4, 1),
        "adjoint": (4 + 4 + 1, 4),  # forward pass, one evaluation per step backwards, one at x0 to start
        sdo.Adjoint(exact=True): (8, 4), "reversible": (8 + 8, 8),  # two evaluations per EDICT step
    }
    for strategy, counts in expected.items():
        job = bench.latent_gradient(chain, x, strategy, lambda x0: x0.pow(2).sum())
        with bench.CallCounter(model) as calls:
            job()
        assert (calls.forward, calls.backward) == counts, strategy
    with bench.CallCounter(model) as calls, torch.no_grad():
        sdo.sample(chain, x)
    assert (calls.forward, calls.backward) == (4, 0)


def test_saved_bytes_of_constant_memory_strategies_do_not_grow_with_steps():
    """The peak of what autograd holds saved, graphs built inside backward included: Full's grows with N,
    the adjoint's and EDICT's stay at one step's."""
    model = TinyNet()
    x = torch.randn(2, 2, 8, 8)
    params = tuple(model.parameters())
    saved = {}
    for n in (3, 12):
        chain = sdo.Chain.from_diffusers(model, DDIMScheduler(clip_sample=False), n)
        for name in ("full", "adjoint", "reversible"):
            job = bench.latent_gradient(chain, x, name, lambda x0: x0.pow(2).sum())
            saved[name, n] = bench.saved_tensor_bytes(job, exclude=params)
    assert saved["full", 12] > 3 * saved["full", 3]
    for name in ("adjoint", "reversible"):
        assert 0 < saved[name, 12] <= saved[name, 3] * 1.01, name
