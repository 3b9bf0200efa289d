"""Diagnostics: ArviZ conversion, pointwise log-likelihoods, plots.

Diagnostics know nothing of :mod:`pyro_subnet.infer`: they read any ``pyro.infer.MCMC``, any object
that behaves like one (``get_samples``, ``num_chains``, ``kernel``, ``diagnostics``) and any guide
by what it offers. ArviZ and Matplotlib are imported where they are used, so that importing the
package loads neither. The predictive metrics are :mod:`pyro_subnet.metrics`.
"""

from .arviz_io import to_inference_data
from .pointwise import full_data, pointwise

__all__ = ["to_inference_data", "pointwise", "full_data"]
