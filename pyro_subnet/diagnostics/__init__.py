"""Diagnostics: predictive metrics (and, later, ArviZ conversion and plots)."""

from . import metrics

__all__ = ["metrics"]
