"""The anchor of reward fine-tuning: DRaFT+'s penalty (Clark et al., 2024) on how far the tuned denoiser's output
moves from the frozen base model's, measured on the model output and on the denoised sample it implies."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..checks import UsageError
from .lora import lora_disabled

__all__ = ["Anchored"]


class Anchored(torch.nn.Module):
    """The tuned model; inside :meth:`record`, on calls that keep a graph, it also runs the frozen base (LoRA off, no
    graph) and records DRaFT+'s penalty (Clark et al., 2024), here on the model output and on the denoised sample it
    implies. The chain calls the model with diffusers' signature, so what to record into is scoped by a context
    (the record of one micro-batch's sampling), not passed with each call."""

    def __init__(self, model: torch.nn.Module, weight: float):
        super().__init__()
        self.model, self.weight, self._record = model, weight, None
        self.config = getattr(model, "config", None)
        self.solver = None  # set by the run: maps a call's output to its denoised sample x0_hat

    @contextlib.contextmanager
    def record(self) -> Iterator[list]:
        """``with anchored.record() as record:`` the calls inside (that keep a graph) append their
        ``(tuned output, base output, step)`` to ``record``, for :meth:`penalty`."""
        record = []
        self._record = record
        try:
            yield record
        finally:
            self._record = None

    def forward(self, sample, timestep=None, **kwargs):
        out = self.model(sample, timestep=timestep, **kwargs)
        if self.weight and self._record is not None and torch.is_grad_enabled():
            with torch.no_grad(), lora_disabled(self.model):
                base = self.model(sample, timestep=timestep, **kwargs)
            # kept as a pair: the penalty is computed after sampling, outside any checkpointed region
            pair = tuple(getattr(o, "sample", o[0] if isinstance(o, tuple) else o) for o in (out, base))
            self._record.append((*pair, self._index(timestep)))
        return out

    def _index(self, timestep) -> int:
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        index = {float(v): i for i, v in enumerate(self.solver.timesteps.tolist())}
        if t not in index:
            raise UsageError(f"timestep {t:g} is not one of the sampler's; the penalty cannot weigh it")
        return index[t]

    def terms(self, record: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per recorded call: (mean((tuned - base)^2), mean((x0_tuned - x0_base)^2)), x0 the denoised sample."""
        out = []
        for a, b, i in record:
            d = a.float() - b.float()
            zero = torch.zeros_like(d)
            dx0 = self.solver.denoised(i, zero, d) - self.solver.denoised(i, zero, zero)  # affine in the output
            out.append(((d**2).mean(), (dx0**2).mean()))
        return out

    def penalty(self, record: list) -> torch.Tensor | None:
        """The mean over the recorded calls of mean((tuned - base)^2) + mean((x0_tuned - x0_base)^2), or None when
        none was recorded. The first term is DRaFT+'s; the second, the same change seen in the denoised sample, is
        what it misses at high noise: for an epsilon model x0_hat = (x - sigma eps) / alpha, so an eps change moves
        x0_hat sigma/alpha times as far (14x at t = 980 on the digits), and the sum is mean((eps - eps_base)^2) /
        alpha_bar_t. Near t = 0 the sum is DRaFT+'s penalty alone."""
        if not record:
            return None
        return torch.stack([out + x0 for out, x0 in self.terms(record)]).mean()
