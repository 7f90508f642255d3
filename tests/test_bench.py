import torch
from diffusers import DDIMScheduler
from helpers import TinyNet

import sdo
from sdo import bench


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
