"""Inference: Laplace guides, stochastic-gradient MCMC kernels, SMC, analytic predictive."""

from . import autoguide, mcmc
from .analytic import AnalyticPredictive
from .autoguide.diagonal_laplace import AutoDiagonalLaplace
from .autoguide.sampled_laplace import AutoSampledLaplace
from .autoguide.subnet_laplace import AutoSubnetLaplace
from .evidence_map import fit_map_by_evidence
from .map import fit_map
from .mcmc import SGHMC, SpikeSlabSGHMC
from .smc import AnnealedSMC

__all__ = ["autoguide", "mcmc", "fit_map", "fit_map_by_evidence", "AutoSubnetLaplace", "AutoSampledLaplace", "SGHMC", "SpikeSlabSGHMC", "AnnealedSMC",
           "AnalyticPredictive", "AutoDiagonalLaplace"]
