"""pyro_subnet: honest, scalable uncertainty for neural networks through Pyro's inference interface.

>>> import pyro_subnet as ps
>>> model = ps.nn.BayesianNet(net, likelihood="classification")      # doctest: +SKIP
"""

from . import data, diagnostics, infer, nn
from .diagnostics import metrics
from . import subnet

__version__ = "0.1.0"
__all__ = ["nn", "infer", "data", "diagnostics", "metrics"]
__all__ += ["subnet"]
