"""Inference: Laplace guides, stochastic-gradient MCMC kernels, SMC, analytic predictive."""

from . import autoguide
from .map import fit_map
from .autoguide.subnet_laplace import AutoSubnetLaplace

__all__ = ["autoguide", "fit_map"]
__all__ += ["AutoSubnetLaplace"]
