"""Stochastic-gradient MCMC kernels for ``pyro.infer.MCMC``: :class:`SGHMC` and
:class:`SpikeSlabSGHMC`.

Where the per-draw sampler statistics live: each kernel's ``diagnostics()`` returns, per chain,
``"divergences"`` (draw indices; read by ``arviz.from_pyro`` into ``sample_stats.diverging``) and
per-draw lists ``"step_size"``, ``"lp"`` and, for the spike-and-slab kernel, ``"sparsity"`` and
``"inclusion_rate"``. ``pyro.infer.MCMC`` collects them as ``mcmc.diagnostics()[name]["chain i"]``
(also when chains run in worker processes), and :func:`pyro_subnet.to_inference_data` puts the
ones a kernel declares in ``per_draw_stats`` into ArviZ's ``sample_stats``.
"""

from .step_size_schedules import Constant, CyclicalCosine, PolynomialDecay
from .sghmc import SGHMC
from .spike_slab_sghmc import SpikeSlabSGHMC

__all__ = ["SGHMC", "SpikeSlabSGHMC", "Constant", "PolynomialDecay", "CyclicalCosine"]
