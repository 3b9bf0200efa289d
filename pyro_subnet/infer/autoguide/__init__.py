"""Laplace guides: the linearised-Laplace shell, the guides, and the subnetwork selection they use.

``curvature`` here is the shared core :mod:`pyro_subnet.infer.curvature`, kept under this name too.
"""

from .. import curvature
from ..curvature import FlatGaussian
from .diagonal_laplace import AutoDiagonalLaplace
from .subnet_laplace import AutoSubnetLaplace

__all__ = ["curvature"]
__all__ += ["FlatGaussian", "AutoSubnetLaplace", "AutoDiagonalLaplace"]
