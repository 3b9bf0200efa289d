"""Distributions for Bayesian neural networks (priors usable in any Pyro model)."""

from .spike_slab import SpikeSlab

__all__ = ["SpikeSlab"]
