"""``ps.subnet``: the subnetwork selection strategies, under the name users write.

The strategies live with the Laplace guides they serve
(:mod:`pyro_subnet.infer.autoguide.subnet_selection`); this module gives them their public name,
``pyro_subnet.subnet``, and adds nothing.

>>> import pyro_subnet as ps
>>> ps.subnet.LargestMagnitude(100)
LargestMagnitude(k=100)
"""

from .infer.autoguide.subnet_selection import (All, ByName, LargestMagnitude, LargestVariance, LastLayer,
                                               PredictiveVariance, Random, SubnetSelection, candidates,
                                               k_from_memory, make_probes, normalisation_sites, parse_memory,
                                               swag_diagonal_variance, warn_if_flat)

__all__ = ["SubnetSelection", "LargestVariance", "LargestMagnitude", "Random", "ByName", "LastLayer", "All",
           "PredictiveVariance", "swag_diagonal_variance", "make_probes", "candidates", "normalisation_sites",
           "parse_memory", "k_from_memory", "warn_if_flat"]
