"""pyro_subnet: honest, scalable uncertainty for neural networks through Pyro's inference interface.

>>> import pyro_subnet as ps
>>> model = ps.nn.BayesianNet(net, likelihood="classification")      # doctest: +SKIP
"""

from . import data, diagnostics, distributions, infer, metrics, nn, subnet
from .diagnostics import plots, to_inference_data

__version__ = "0.1.0"
__all__ = ["nn", "infer", "subnet", "data", "diagnostics", "distributions", "metrics", "plots",
           "to_inference_data"]
