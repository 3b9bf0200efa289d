"""Posteriors -> ArviZ. The one module of the package that imports ArviZ.

:func:`to_inference_data` turns a ``pyro.infer.MCMC`` run (NUTS or our stochastic-gradient
kernels), an MCMC-like object (:class:`~pyro_subnet.infer.AnnealedSMC`) or any guide into ArviZ
data with the groups

* ``posterior``: every latent site, ``(chain, draw, *site_shape)``;
* ``sample_stats``: ``lp`` (log joint), ``diverging``, and the method's own statistics (step
  sizes, sparsity and inclusion rate, SMC ESS and log evidence) where the object reports them;
* ``log_likelihood``: pointwise ``log p(y_n | theta)`` of every observed site, always present, so
  ``arviz.loo`` runs without arguments, for batch-aware models and plain ``PyroModule[nn.Linear]``
  networks alike (:mod:`pyro_subnet.diagnostics.pointwise`);
* ``posterior_predictive`` and ``observed_data``.

On ArviZ 0.x (Python 3.11) the result is an ``arviz.InferenceData``; on ArviZ 1.x (Python 3.12+)
it is the ``xarray.DataTree`` that ArviZ 1 uses, built from the same nested dict.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .pointwise import group_by_chain, pointwise


def arviz_major() -> int:
    import arviz as az
    return int(az.__version__.split(".")[0])


def from_groups(groups: Dict[str, Dict[str, np.ndarray]], attrs: Optional[dict] = None):
    """Build ArviZ data from ``{group: {var: array}}`` (leading ``(chain, draw)`` axes, except in
    ``observed_data``) on either ArviZ line."""
    import arviz as az
    groups = {g: {k: np.asarray(v) for k, v in d.items()} for g, d in groups.items() if d}
    if arviz_major() >= 1:
        return az.from_dict(groups, attrs={"/": attrs} if attrs else None)
    return az.from_dict(**groups, attrs=attrs)


def group_names(data):
    """Group names of ``InferenceData`` (0.x) or ``DataTree`` (1.x)."""
    return list(data.children) if hasattr(data, "children") else list(data.groups())


def _numpy(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _is_mcmc_like(obj) -> bool:
    return hasattr(obj, "get_samples") and hasattr(obj, "num_chains")


def _guide_draws(guide, num_samples: int, args, kwargs) -> Dict[str, torch.Tensor]:
    if hasattr(guide, "sample_posterior"):
        return guide.sample_posterior(num_samples, *args, **kwargs)
    draws = []
    with torch.no_grad():
        for _ in range(num_samples):
            tr = poutine.trace(guide).get_trace(*args, **kwargs)
            draws.append({n: s["value"] for n, s in tr.nodes.items()
                          if s["type"] == "sample" and not s["is_observed"]
                          and not s["infer"].get("is_auxiliary", False) and not site_is_subsample(s)})
    return {k: torch.stack([d[k] for d in draws]) for k in draws[0]}


def _method_stats(obj, num_chains: int, num_draws: int) -> Dict[str, np.ndarray]:
    """Per-draw statistics an object reports through ``sample_stats()`` (on itself or its
    kernel), as ``(chain, draw)`` arrays; per-chain scalars are repeated over the draws."""
    stats = {}
    for source in (obj, getattr(obj, "kernel", None)):
        fn = getattr(source, "sample_stats", None)
        if callable(fn):
            for k, v in fn().items():
                a = _numpy(v)
                if a.ndim == 0:
                    a = np.full((num_chains, num_draws), a)
                elif a.shape == (num_chains,):
                    a = np.repeat(a[:, None], num_draws, axis=1)
                elif a.shape == (num_chains * num_draws,):
                    a = a.reshape(num_chains, num_draws)
                stats.setdefault(k, a)
    return stats


def to_inference_data(obj, *args, num_samples: int = 200, model=None, **kwargs):
    """Convert a posterior to ArviZ data (see the module docstring).

    :param obj: ``pyro.infer.MCMC``, an MCMC-like object (``get_samples``, ``num_chains``), or a
        guide (any callable that samples the latent sites, e.g. an ``AutoGuide``).
    :param args, kwargs: the model's arguments, e.g. ``(x, y)``. For MCMC-like objects they
        default to those of the run.
    :param num_samples: draws taken from a guide.
    :param model: the model, for guides that do not carry it as ``guide.model``.

    >>> idata = ps.to_inference_data(mcmc)                                      # doctest: +SKIP
    >>> arviz.loo(idata)                                                        # doctest: +SKIP
    """
    if _is_mcmc_like(obj):
        kernel = getattr(obj, "kernel", None)
        model = model or getattr(kernel, "model", None) or getattr(obj, "model", None)
        if not args and not kwargs:
            args, kwargs = getattr(obj, "_args", ()), getattr(obj, "_kwargs", {}) or {}
        num_chains = obj.num_chains
        draws = obj.get_samples(group_by_chain=False)
        diag = obj.diagnostics() if hasattr(obj, "diagnostics") else {}
        divergences = diag.get("divergences") if isinstance(diag, dict) else None
    else:
        model = model or getattr(obj, "model", None)
        if model is None:
            raise ValueError("to_inference_data: pass model= for a guide that does not carry its model.")
        num_chains = 1
        draws = _guide_draws(obj, num_samples, args, kwargs)
        divergences = None
    if model is None:
        raise ValueError(f"to_inference_data: cannot find the model of {type(obj).__name__}.")
    if not args and not kwargs:
        raise ValueError("to_inference_data: pass the model's data, e.g. to_inference_data(obj, x, y).")

    pw = pointwise(model, draws, *args, **kwargs)
    by_chain, num_draws = group_by_chain(pw.draws, num_chains)  # singleton plate slots removed
    posterior = {k: _numpy(v) for k, v in by_chain.items()}
    log_lik = {k: _numpy(v).reshape(num_chains, num_draws, *v.shape[1:]) for k, v in pw.log_likelihood.items()}
    post_pred = {k: _numpy(v).reshape(num_chains, num_draws, *v.shape[1:])
                 for k, v in pw.posterior_predictive.items()}
    diverging = np.zeros((num_chains, num_draws), dtype=bool)
    if isinstance(divergences, dict):
        for i, key in enumerate(sorted(divergences)):
            idx = np.asarray(divergences[key], dtype=int)
            if i < num_chains and idx.size:
                diverging[i, idx[idx < num_draws]] = True
    stats = {"lp": _numpy(pw.log_joint).reshape(num_chains, num_draws), "diverging": diverging}
    stats.update(_method_stats(obj, num_chains, num_draws))
    groups = {"posterior": posterior, "sample_stats": stats, "log_likelihood": log_lik,
              "posterior_predictive": post_pred,
              "observed_data": {k: _numpy(v) for k, v in pw.observed.items()}}
    attrs = {"inference_library": "pyro_subnet", "method": type(obj).__name__}
    return from_groups(groups, attrs)
