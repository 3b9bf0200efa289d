"""Diagnostics: predictive metrics, ArviZ conversion, pointwise log-likelihoods."""

from .arviz_io import to_inference_data
from .pointwise import full_data, pointwise

__all__ = ["metrics", "to_inference_data", "pointwise", "full_data"]
