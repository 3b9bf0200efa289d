"""Subnetwork selection: which ``k`` weights get a full-covariance posterior.

Every strategy returns sorted indices into the flat weight vector (``model.layout`` order):
``strategy.select(model, theta_map, (x, y), prior_precision=None) -> LongTensor``. Sizes are a
count ``k`` or a memory budget ``max_memory="200MB"`` for the dense ``k x k`` matrices.

The strategies are a part of the Laplace guides (they choose the guides' subnetwork) and import
no guide: they read the model's bridge, the curvature core (:mod:`pyro_subnet.infer.curvature`)
and the MAP objective. Users reach them as ``ps.subnet`` (:mod:`pyro_subnet.subnet`).

>>> import pyro_subnet as ps
>>> ps.subnet.LargestVariance(k=1000, method="swag")
LargestVariance(k=1000, method='swag')
"""

from .contract import SubnetSelection, candidates, k_from_memory, normalisation_sites, parse_memory, warn_if_flat
from .predictive_variance import PredictiveVariance, make_probes
from .strategies import All, ByName, LargestMagnitude, LargestVariance, LastLayer, Random
from .swag import swag_diagonal_variance

__all__ = ["SubnetSelection", "LargestVariance", "LargestMagnitude", "Random", "ByName", "LastLayer", "All",
           "PredictiveVariance", "swag_diagonal_variance", "make_probes", "candidates", "normalisation_sites",
           "parse_memory", "k_from_memory", "warn_if_flat"]
