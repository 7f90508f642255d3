"""What every latent task run shares (:mod:`~sdo.recipes.latent_tasks`, :mod:`~sdo.recipes.noise`): the task's
chain over a pipeline, the start step nearest a timestep, the latent to optimize (noise run to that step), the
unoptimized sample, the optimization of an objective of the decoded image, and the result a task command saves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backbones.conditioning import task_scheduler, text_conditioning
from ..backbones.families import flow_schedule
from ..backbones.pipeline import Pipeline
from ..backbones.vae import decoded
from ..chain import Chain
from ..checks import check_int
from ..latent import LatentResult, optimize_latent
from ..sampling import sample

__all__ = ["TaskResult", "noise_latent", "optimize_decoded", "replay", "sample_before", "step_at", "task_chain",
           "where"]


def step_at(chain: Chain, t: int) -> int:
    """The index of the chain's step whose timestep is nearest to ``t`` (the paper gives start points as t), a
    whole number within the model's training schedule, 0 to ``num_train_timesteps``."""
    t = check_int("start_t", t, minimum=0, maximum=chain.solver.num_train_timesteps)
    return int((chain.timesteps.float() - float(t)).abs().argmin())


@dataclass
class TaskResult:
    """A latent task's images before and after, its optimization and its metrics."""

    before: torch.Tensor  # images in [-1, 1], (B, 3, H, W)
    after: torch.Tensor
    optimization: LatentResult
    metrics: dict = field(default_factory=dict)

    def save(self, out: Path, command: str, prompt: str | None, curve: str, settings: dict,
             title: str | None = None) -> dict:
        """Write what a task command writes into the folder ``out``: ``before_after.png`` (titled ``title``, by
        default ``prompt``), ``loss.png`` (the loss curve, labelled ``curve``, and a regularizer's penalty beside it)
        and ``metrics.json`` (the prompt if there is one, the metrics, the losses, the penalties if any, the seconds
        and ``settings``); returns those metrics."""
        import json

        from .. import report

        run = self.optimization
        report.save_grid([("before", self.before), ("after", self.after)], out / "before_after.png",
                         title=title or prompt)
        curves = {curve: run.losses, **({"penalty (the regularizer)": run.penalties} if run.penalties else {})}
        report.plot_curves(curves, out / "loss.png", f"sdo {command}", "iteration", "loss")
        metrics = {"command": command, **({"prompt": prompt} if prompt is not None else {}), **self.metrics,
                   "losses": run.losses, **({"penalties": run.penalties} if run.penalties else {}),
                   "seconds": run.seconds, "settings": settings}
        if run.picard_runs:
            metrics["picard_sweeps"] = [sweeps for sweeps, _ in run.picard_runs]
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics


def task_chain(pipe: Pipeline, prompt: str, steps: int, guidance_scale: float, scheduler: str | None) -> Chain:
    """The task's chain: ``scheduler`` (see :func:`sdo.backbones.task_scheduler`) over the pipeline's backbone,
    conditioned on ``prompt`` as its pipeline does (:func:`sdo.backbones.text_conditioning`)."""
    chosen = task_scheduler(pipe.scheduler, scheduler)
    return Chain.from_diffusers(pipe.denoiser, chosen, steps, **text_conditioning(pipe, prompt, guidance_scale),
                                **flow_schedule(pipe, steps, chosen))


def where(chain: Chain, start: int) -> dict:
    """The metrics that say where the optimization ran: its start step and timestep, and the sampler."""
    return {"start_step": start, "start_t": int(chain.timesteps[start]), "solver": type(chain.solver).__name__}


def replay(generator: torch.Generator) -> torch.Generator:
    """A copy of ``generator`` at its current state: the unoptimized sample then draws the same solver noise as
    every optimization iteration (stochastic schedulers such as LCM), so 'before' is iteration 0's sample."""
    copy = torch.Generator()
    copy.set_state(generator.get_state())
    return copy


def sample_before(chain, latent, start, decode, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The unoptimized sample: in latent space, and decoded."""
    with torch.no_grad():
        x0 = sample(chain, latent, start=start, generator=generator)
        return x0, decode(x0).float()


def optimize_decoded(chain, latent, start, objective, decode, strategy, iterations, lr, progress, constraint=None,
                     generator=None, **options) -> tuple:
    """(decoded best sample, the optimization) of ``objective`` on decoded images; ``options``:
    :func:`~sdo.optimize_latent`'s others (optimizer, step_rule, callback, regularizer)."""
    result = optimize_latent(chain, latent, decoded(objective, decode), strategy=strategy, start=start,
                             iterations=iterations, lr=lr, constraint=constraint, progress=progress,
                             generator=generator, **options)
    with torch.no_grad():
        return decode(result.best_sample).float(), result


def noise_latent(pipe: Pipeline, chain: Chain, start: int, generator: torch.Generator) -> torch.Tensor:
    """Noise run (without a graph) from x_T to step ``start``: the latent the generation tasks optimize. x_T,
    then the noise of stochastic steps before ``start``, come from ``generator``."""
    channels = pipe.denoiser.config.in_channels
    side = pipe.image_size // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    dtype = next(pipe.denoiser.parameters()).dtype
    x = (torch.randn(1, channels, side, side, generator=generator) * chain.init_noise_sigma).to(pipe.device, dtype)
    if start == 0:
        return x
    with torch.no_grad():
        return sample(chain, x, stop=start, generator=generator)
