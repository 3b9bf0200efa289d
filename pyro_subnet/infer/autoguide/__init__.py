"""Laplace guides and the curvature core they share."""

from . import curvature
from .diagonal_laplace import AutoDiagonalLaplace
from .gaussian import FlatGaussian
from .subnet_laplace import AutoSubnetLaplace

__all__ = ["curvature"]
__all__ += ["FlatGaussian", "AutoSubnetLaplace", "AutoDiagonalLaplace"]
