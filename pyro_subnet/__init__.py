"""pyro_subnet: honest, scalable uncertainty for neural networks through Pyro's inference interface.

>>> import pyro, torch
>>> from torch import nn
>>> import pyro_subnet as ps
>>> pyro.set_rng_seed(0)
>>> x = torch.randn(20, 2); y = torch.randint(0, 3, (20,))
>>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
>>> model = ps.nn.BayesianNet(net, likelihood="classification")
>>> guide = ps.infer.AutoDiagonalLaplace(model, map_steps=100, progress=False).fit(x, y)
>>> probs = guide.predict(x)                   # the linearised (GLM) predictive
>>> probs.shape, torch.allclose(probs.sum(-1), torch.ones(20))
(torch.Size([20, 3]), True)
>>> pyro.infer.Predictive(model, guide=guide, num_samples=5)(x)["obs"].shape
torch.Size([5, 20])
"""

from . import data, diagnostics, distributions, infer, metrics, nn, subnet
from .diagnostics import plots, to_inference_data

__version__ = "0.1.0"
__all__ = ["nn", "infer", "subnet", "data", "diagnostics", "distributions", "metrics", "plots",
           "to_inference_data"]
