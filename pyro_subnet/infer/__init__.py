"""Inference: Laplace guides, stochastic-gradient MCMC kernels, SMC, analytic predictive."""

from . import autoguide
from .map import fit_map

__all__ = ["autoguide", "fit_map"]
from .analytic import AnalyticPredictive  # noqa: E402
__all__ += ["AnalyticPredictive"]
