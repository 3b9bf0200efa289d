"""Per-draw sampler statistics of the SG kernels as ArviZ ``sample_stats`` arrays.

``pyro.infer.MCMC`` keeps what a kernel's ``diagnostics()`` returns, per chain, in
``mcmc.diagnostics()[name]["chain i"]``; ``arviz.from_pyro`` reads only ``"divergences"`` from
it. The SG kernels store one value per draw under ``"step_size"``, ``"lp"`` and, for
:class:`~pyro_subnet.infer.SpikeSlabSGHMC`, ``"sparsity"`` and ``"inclusion_rate"``. The helpers
here return them as ``(chain, draw)`` arrays and add them to an ``InferenceData``.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

PER_DRAW = ("step_size", "lp", "sparsity", "inclusion_rate")


def sample_stats(mcmc) -> Dict[str, np.ndarray]:
    """``{name: (chain, draw) array}`` of the kernel's per-draw statistics, plus ``diverging``.

    >>> stats = sample_stats(mcmc)                            # doctest: +SKIP
    >>> stats["sparsity"].shape == (mcmc.num_chains, mcmc.num_samples)   # doctest: +SKIP
    True
    """
    diag = mcmc.diagnostics()
    chains = [f"chain {i}" for i in range(mcmc.num_chains)]
    out = {}
    for name in PER_DRAW:
        if name in diag:
            out[name] = np.asarray([diag[name][c] for c in chains], dtype=float)
    diverging = np.zeros((mcmc.num_chains, mcmc.num_samples), dtype=bool)
    for i, c in enumerate(chains):
        diverging[i, diag["divergences"][c]] = True
    out["diverging"] = diverging
    return out


def add_sample_stats(idata, mcmc):
    """Add the per-draw statistics of ``mcmc`` to ``idata.sample_stats`` (created if absent);
    returns ``idata``. For ArviZ 0.x ``InferenceData``."""
    import xarray as xr
    stats = sample_stats(mcmc)
    coords = {"chain": np.arange(mcmc.num_chains), "draw": np.arange(mcmc.num_samples)}
    ds = xr.Dataset({k: (("chain", "draw"), v) for k, v in stats.items()}, coords=coords)
    if "sample_stats" in idata.groups():
        idata.sample_stats = idata.sample_stats.assign({k: ds[k] for k in stats})
    else:
        idata.add_groups({"sample_stats": ds})
    return idata
