"""Stochastic-gradient MCMC kernels for ``pyro.infer.MCMC``."""

from .schedules import Constant, CyclicalCosine, PolynomialDecay
from .sghmc import SGHMC
from .spike_slab import SpikeSlabSGHMC
from .stats import add_sample_stats, sample_stats

__all__ = ["SGHMC", "SpikeSlabSGHMC", "Constant", "PolynomialDecay", "CyclicalCosine", "sample_stats", "add_sample_stats"]
