"""ReFL's pre-training loss (Xu et al., 2023: ReFL trains the reward loss together with the model's own denoising
loss on real data, against overfitting the reward), usable beside every fine-tuning method:
``FinetuneConfig.pretrain_weight`` times the diffusion training loss of the tuned model on a batch of the task's data
(``FinetuneTask.data``) per micro-batch.

The loss is the one the model was trained with, as diffusers' training scripts write it: t drawn uniformly from the
training timesteps, x_t = ``DDPMScheduler.add_noise(x0, eps, t)`` from the sampling scheduler's config (its betas and
prediction type, whatever scheduler samples), and mean((model(x_t, t) - target)^2) with target eps (``epsilon``), the
velocity sqrt(abar) eps - sqrt(1 - abar) x0 (``v_prediction``) or x0 (``sample``); for a flow-matching scheduler,
x_t = (1 - s) x0 + s eps at s = t / T and the target eps - x0."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..checks import UsageError
from ..denoiser import Denoiser

__all__ = ["diffusion_loss"]


def diffusion_loss(model: Callable, scheduler, x0: torch.Tensor, cond: dict,
                   generator: torch.Generator) -> torch.Tensor:
    """The denoising loss of ``model`` (called as the chain calls it, with ``cond``) on clean latents ``x0``, its
    timesteps and noise drawn from ``generator`` (module docstring)."""
    from diffusers import DDPMScheduler

    denoiser = Denoiser(model, cond)
    total = int(scheduler.config.num_train_timesteps)
    t = torch.randint(0, total, (x0.shape[0],), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        s = (t.to(x0.dtype) / total).view(-1, *[1] * (x0.dim() - 1))
        x_t, target = (1 - s) * x0 + s * eps, eps - x0
    else:  # the VP forward process of the model's training, whatever scheduler samples it (diffusers' train scripts)
        noising = DDPMScheduler.from_config(scheduler.config)
        x_t = noising.add_noise(x0, eps, t)
        kind = noising.config.prediction_type
        if kind == "epsilon":
            target = eps
        elif kind == "v_prediction":
            target = noising.get_velocity(x0, eps, t)
        elif kind == "sample":
            target = x0
        else:
            raise UsageError(f"the pre-training loss does not know prediction_type {kind!r}")
    out = denoiser(x_t, t.to(x0.dtype) if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" else t)
    return ((out.float() - target.float()) ** 2).mean()
