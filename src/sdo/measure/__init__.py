"""Measurements of gradients and their costs: :mod:`~sdo.measure.fidelity` (agreement with Full's gradient, norms
against depth: the paper's Table 3 columns and Fig. 11a) and :mod:`~sdo.measure.profile` (time, peak memory, saved
tensor bytes, denoiser calls). The ``sdo bench`` command (:mod:`sdo.cli.bench`) reports them."""

from .fidelity import GradientFidelity, gradient_fidelity, gradient_norm_by_depth, strategy_gradient

__all__ = ["GradientFidelity", "gradient_fidelity", "gradient_norm_by_depth", "strategy_gradient"]
