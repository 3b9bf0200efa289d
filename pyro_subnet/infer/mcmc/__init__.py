"""Stochastic-gradient MCMC kernels for ``pyro.infer.MCMC``: :class:`SGHMC` and
:class:`SpikeSlabSGHMC`.

Where the per-draw sampler statistics live: each kernel's ``diagnostics()`` returns, per chain,
``"divergences"`` (draw indices; read by ``arviz.from_pyro`` into ``sample_stats.diverging``) and
per-draw lists ``"step_size"``, ``"lp"`` and, for the spike-and-slab kernel, ``"sparsity"`` and
``"inclusion_rate"``. ``pyro.infer.MCMC`` collects them as ``mcmc.diagnostics()[name]["chain i"]``
(also when chains run in worker processes); :func:`sample_stats` returns them as ``(chain, draw)``
arrays and :func:`add_sample_stats` adds them to an ArviZ ``InferenceData``'s ``sample_stats``.
"""

from .schedules import Constant, CyclicalCosine, PolynomialDecay
from .sghmc import SGHMC
from .spike_slab import SpikeSlabSGHMC
from .stats import add_sample_stats, sample_stats

__all__ = ["SGHMC", "SpikeSlabSGHMC", "Constant", "PolynomialDecay", "CyclicalCosine", "sample_stats",
           "add_sample_stats"]
