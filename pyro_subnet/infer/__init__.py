"""Inference: Laplace guides, stochastic-gradient MCMC kernels, SMC, analytic predictive."""

from . import autoguide
from .map import fit_map

__all__ = ["autoguide", "fit_map"]
from . import mcmc
from .mcmc import SGHMC
from .mcmc import SpikeSlabSGHMC
