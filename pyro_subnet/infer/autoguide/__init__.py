"""Laplace guides and the curvature core they share."""

from . import curvature

__all__ = ["curvature"]
