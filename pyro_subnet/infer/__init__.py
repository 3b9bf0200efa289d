"""Inference: Laplace guides, stochastic-gradient MCMC kernels, SMC, analytic predictive."""

from . import autoguide
from .map import fit_map

__all__ = ["autoguide", "fit_map"]
from .smc import AnnealedSMC

__all__ += ["AnnealedSMC"]
