"""One-pass posterior predictive by moment propagation (Li et al., ICLR 2025)."""

from ..curvature import FlatGaussian
from .layers import register
from .posterior import FlatPosterior, read_posterior
from .predictive import AnalyticPredictive

__all__ = ["AnalyticPredictive", "FlatGaussian", "FlatPosterior", "read_posterior", "register"]
