"""sdo: gradient-based control of diffusion sampling (Shortcut Diffusion Optimization and its baselines).

    chain = sdo.Chain.from_diffusers(unet, scheduler, 50)
    x0 = sdo.sample(chain, x_T, strategy="sdo")          # graph of one denoiser call only
    result = sdo.optimize_latent(chain, x_T, objective)  # Adam on the initial noise
    sdo.picard_sample(chain, x_T, window=10)              # ParaDiGMS: batched Picard sweeps over the steps
    sdo.finetune(task, sdo.FinetuneConfig(output="run"))  # LoRA reward fine-tuning through the sampler
    sdo.shortft(task, sdo.FinetuneConfig(output="run"))  # ShortFT: through a chain shortened by a few-step model

The names here, by floor (``__all__``): the contracts (``Chain``, ``Denoiser``, ``Solver``, ``SolverState``,
``solver_from_scheduler``, ``SUPPORTED_SCHEDULERS``); the gradient methods and their name table (``Strategy``,
``ConstantMemory``, ``Full``, ``Checkpoint``, ``Truncated``, ``RandomTruncated``, ``Shortcut``, ``Adjoint``,
``Reversible``, ``edict_step``, ``get_strategy``, ``register_strategy``, ``available_strategies``); the samplers
(``sample``, ``invert``, ``round_trip_error``, ``guided_sample``/``Guidance``, ``picard_sample``/``Picard``/
``PicardResult``); the loops with their options and results (``optimize_latent``/``LatentResult``/``LinfBall``,
with the noise priors ``NormPrior``/``ProbabilityRegularizer``; ``finetune``/``shortft``/``FinetuneConfig``/
``FinetuneTask``/``FinetuneResult``, ShortFT's ``TimestepLoRA``, ``load_shortft``, ``segment_ends``,
``short_chain``); measurement (``gradient_fidelity``/``GradientFidelity``,
``gradient_norm_by_depth``); what a pipeline needs (``encode_prompts``, ``VAEDecoder``, ``decoded``); and the two
errors (``UsageError``, ``NonFiniteError``). Everything else lives in its package (``sdo.objectives``,
``sdo.backbones``, ``sdo.recipes``, ``sdo.embedded``, ``sdo.finetuning``, ``sdo.measure``).
"""

from . import _moved
from . import backbones as backbones  # sdo.backbones.X and sdo.objectives.X work after `import sdo`
from . import objectives as objectives
from .backbones.conditioning import encode_prompts
from .backbones.vae import VAEDecoder, decoded
from .chain import Chain
from .checks import NonFiniteError, UsageError
from .denoiser import Denoiser
from .finetuning import FinetuneConfig, FinetuneResult, FinetuneTask, finetune, shortft
from .finetuning.shortft import TimestepLoRA, load_shortft, segment_ends, short_chain
from .gradients import (
    Adjoint,
    Checkpoint,
    ConstantMemory,
    Full,
    RandomTruncated,
    Reversible,
    Shortcut,
    Strategy,
    Truncated,
    available_strategies,
    edict_step,
    get_strategy,
    register_strategy,
)
from .guidance import Guidance, guided_sample
from .inversion import invert
from .latent import LatentResult, LinfBall, NormPrior, ProbabilityRegularizer, optimize_latent
from .measure import GradientFidelity, gradient_fidelity, gradient_norm_by_depth
from .picard import Picard, PicardResult, picard_sample
from .sampling import round_trip_error, sample
from .solvers import SUPPORTED_SCHEDULERS, Solver, SolverState, solver_from_scheduler

# the module names sdo had before 2026-12 (sdo.strategies, sdo.tasks, ...) still import, with a warning
_moved.install()

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_SCHEDULERS",
    "Adjoint",
    "Chain",
    "Checkpoint",
    "ConstantMemory",
    "Denoiser",
    "FinetuneConfig",
    "FinetuneResult",
    "FinetuneTask",
    "Full",
    "GradientFidelity",
    "Guidance",
    "LatentResult",
    "LinfBall",
    "NonFiniteError",
    "NormPrior",
    "Picard",
    "PicardResult",
    "ProbabilityRegularizer",
    "RandomTruncated",
    "Reversible",
    "Shortcut",
    "Solver",
    "SolverState",
    "Strategy",
    "TimestepLoRA",
    "Truncated",
    "UsageError",
    "VAEDecoder",
    "available_strategies",
    "decoded",
    "edict_step",
    "encode_prompts",
    "finetune",
    "get_strategy",
    "gradient_fidelity",
    "gradient_norm_by_depth",
    "guided_sample",
    "invert",
    "load_shortft",
    "optimize_latent",
    "picard_sample",
    "register_strategy",
    "round_trip_error",
    "sample",
    "segment_ends",
    "short_chain",
    "shortft",
    "solver_from_scheduler",
]
