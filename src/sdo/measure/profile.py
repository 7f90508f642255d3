"""Measuring what a gradient costs: time (warmed up, interleaved rounds; the minimum, with the spread), peak memory
and the bytes autograd saves. Every cost figure the demo and the benchmarks print comes from here."""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Self

import torch
from tqdm.auto import tqdm

from ..chain import Chain
from ..sampling import sample

__all__ = [
    "CallCounter",
    "latent_gradient",
    "peak_memory",
    "saved_tensor_bytes",
    "time_above_floor",
    "time_jobs",
    "timing_row",
]


def latent_gradient(
    chain: Chain, x: torch.Tensor, strategy, objective: Callable, params: Sequence[torch.Tensor] = (), **sample_kwargs
) -> Callable:
    """A job computing one gradient of ``objective(sample(chain, x))`` with respect to ``x`` and ``params``
    (strategy None: no-grad sampling); returns the latent's gradient (or the sample)."""

    def job():
        if strategy is None:
            with torch.no_grad():
                return sample(chain, x, **sample_kwargs)
        latent = x.detach().clone().requires_grad_(True)
        loss = objective(sample(chain, latent, strategy=strategy, **sample_kwargs)).sum()
        return torch.autograd.grad(loss, [latent, *params])[0]

    return job


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_jobs(
    jobs: dict[str, Callable], repeats: int = 3, device="cpu", warmup: bool = True, progress: bool = True
) -> dict[str, list[float]]:
    """Seconds per run of every job: a warm-up run each (unless the caller has just run them), then ``repeats``
    interleaved rounds (so that drifts of the machine hit all jobs alike). Returns every time; take the median."""
    times = {name: [] for name in jobs}
    first = 0 if warmup else 1
    order = [(r, name) for r in range(first, repeats + 1) for name in jobs]
    for r, name in tqdm(order, desc="timing", disable=not progress):
        _sync(device)
        began = time.perf_counter()
        jobs[name]()
        _sync(device)
        if r > 0:  # round 0 is the warm-up
            times[name].append(time.perf_counter() - began)
    return times


def time_above_floor(jobs: dict[str, Callable], floor: str | None, repeats: int = 3, device="cpu",
                     warmup: bool = True, progress: bool = True, extra: int = 3) -> dict[str, list[float]]:
    """:func:`time_jobs`, then up to ``extra`` times ``repeats`` more interleaved rounds while the job ``floor``
    (no-grad sampling: a strict part of every gradient's work) has a larger minimum time than another job: a gradient
    timed faster than sampling alone is noise, so it is timed again rather than printed. The caller reports what
    remains."""
    times = time_jobs(jobs, repeats=repeats, device=device, warmup=warmup, progress=progress)
    for _ in range(extra if floor in jobs else 0):
        if min(times[floor]) <= min(min(t) for name, t in times.items() if name != floor):
            break
        for name, more in time_jobs(jobs, repeats=repeats, device=device, warmup=False, progress=progress).items():
            times[name] += more
    return times


def timing_row(times: list[float]) -> dict:
    """The minimum of a job's timed rounds (noise only adds time) and their spread."""
    return {"seconds": min(times), "median_seconds": statistics.median(times), "max_seconds": max(times),
            "rounds": len(times)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    gc.collect()
    try:  # return freed heap pages to the OS, so RSS starts from what is really in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident size (VmHWM) to its current size (Linux >= 4.0); False if denied."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def peak_memory(job: Callable, device="cpu", interval: float = 0.0005) -> int:
    """Peak memory a run of ``job`` adds (bytes). CUDA: ``max_memory_allocated`` over what was allocated
    before. CPU (Linux): the peak resident size during the run (VmHWM, reset before it; where the kernel
    refuses the reset, a thread samples the resident size every ``interval`` seconds) over the resident size
    before it, after freed memory has been returned to the OS."""
    if torch.device(device).type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        job()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not os.path.exists("/proc/self/statm"):
        raise RuntimeError("CPU peak memory needs /proc (Linux)")
    _release_free_memory()
    base = _rss()
    if _reset_peak_rss():
        job()
        return _peak_rss() - base
    peak, done = [base], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(interval)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        job()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], _rss()) - base


class _Packed:
    """What autograd holds for a saved tensor while the hooks below are on; releases its count when dropped."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor):
        self.tensor = tensor


def saved_tensor_bytes(job: Callable, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Peak bytes of the tensors autograd holds saved for backward at any moment of ``job`` (distinct storages;
    ``exclude``: tensors that exist anyway, such as the model's parameters). Graphs built and freed inside a
    backward pass (the adjoint's and reversible methods' one-step graphs) count while they live.
    Non-reentrant checkpointing hides its saves behind its own hooks and shows ~0."""
    own = {t.untyped_storage().data_ptr() for t in exclude}
    live: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
    total, peak = [0], [0]

    def release(ptr):
        entry = live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            total[0] -= entry[1]
            del live[ptr]

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return t
        if ptr in own or nbytes == 0:
            return t
        entry = live.setdefault(ptr, [0, nbytes])
        if entry[0] == 0:
            total[0] += nbytes
            peak[0] = max(peak[0], total[0])
        entry[0] += 1
        packed = _Packed(t)
        weakref.finalize(packed, release, ptr)
        return packed

    def unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        job()
    return peak[0]


class CallCounter:
    """Counts a module's forward calls (a pre-hook: checkpointing's recomputation stops early and never
    returns) and the backward passes through their outputs (a gradient hook on each output that requires
    grad). ``with CallCounter(model) as calls: ...``."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.forward, self.backward, self._handles = module, 0, 0, ()

    def _count_forward(self, module, args):
        self.forward += 1

    def _count_backward(self, grad):
        self.backward += 1

    def _hook(self, module, args, output):
        out = getattr(output, "sample", output)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if torch.is_tensor(out) and out.requires_grad:
            out.register_hook(self._count_backward)

    def __enter__(self) -> Self:
        self.forward = self.backward = 0
        self._handles = (
            self.module.register_forward_pre_hook(self._count_forward),
            self.module.register_forward_hook(self._hook),
        )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
