"""Posteriors -> ArviZ. The one module of the package that imports ArviZ.

:func:`to_inference_data` turns a ``pyro.infer.MCMC`` run (NUTS or our stochastic-gradient
kernels), an MCMC-like object (:class:`~pyro_subnet.infer.AnnealedSMC`) or any guide into ArviZ
data with the groups

* ``posterior``: every latent site, ``(chain, draw, *site_shape)``;
* ``sample_stats``: ``lp`` (exact full-data log joint), ``diverging``, and the method's own
  statistics read from its ``diagnostics()`` (:func:`method_stats`): SGHMC's ``step_size`` and
  ``lp_minibatch``, SpikeSlabSGHMC's ``sparsity`` and ``inclusion_rate`` per draw; SMC's
  per-chain ``log_evidence``, ``final_ess``, step and gradient counts;
* ``log_likelihood``: pointwise ``log p(y_n | theta)`` of every observed site, always present, so
  ``arviz.loo`` runs without arguments, for batch-aware models and plain ``PyroModule[nn.Linear]``
  networks alike (:mod:`pyro_subnet.diagnostics.pointwise`);
* ``posterior_predictive`` and ``observed_data``;
* ``step_stats`` (SMC): the per-step series (``ess``, ``acceptance_rate``, ``num_data``, ...) with
  dims ``(chain, step)``.

On ArviZ 0.x (Python 3.11) the result is an ``arviz.InferenceData``; on ArviZ 1.x (Python 3.12+)
it is the ``xarray.DataTree`` that ArviZ 1 uses, built from the same nested dict.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from .pointwise import group_by_chain, pointwise


def arviz_major() -> int:
    import arviz as az
    return int(az.__version__.split(".")[0])


def from_groups(groups: Dict[str, Dict[str, np.ndarray]], attrs: Optional[dict] = None,
                extra: Optional[Dict[str, Dict[str, Tuple[Tuple[str, ...], np.ndarray]]]] = None):
    """Build ArviZ data from ``{group: {var: array}}`` (leading ``(chain, draw)`` axes, except in
    ``observed_data``) on either ArviZ line; the one place that knows the difference.

    :param extra: groups whose axes are not ``(chain, draw)``, ``{group: {var: (dims, array)}}``
        (e.g. SMC's per-step series, dims ``("chain", "step")``), attached as they are.
    """
    import arviz as az
    import xarray as xr
    groups = {g: {k: _float64(v) for k, v in d.items()} for g, d in groups.items() if d}
    extra = {g: xr.Dataset({k: (dims, _float64(a)) for k, (dims, a) in d.items()})
             for g, d in (extra or {}).items() if d}
    if arviz_major() >= 1:  # xarray.DataTree; from_dict takes the nested dict
        tree = az.from_dict(groups, attrs={"/": attrs} if attrs else None)
        for g, ds in extra.items():
            tree[g] = xr.DataTree(ds)
        return tree
    idata = az.from_dict(**groups, attrs=attrs)
    if extra:
        idata.add_groups(extra)
    return idata


def _float64(a) -> np.ndarray:
    """Floating arrays in float64: ArviZ's LOO exponentiates log-likelihood differences, which a
    float32 log-likelihood of a sharp regression posterior turns into NaN."""
    a = np.asarray(a)
    return a.astype(np.float64) if a.dtype.kind == "f" else a


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


STEP_GROUP = "step_stats"


def _declared_per_draw(obj) -> Dict[str, str]:
    """``{diagnostics key: sample_stats name}`` a sampler declares as one value per draw
    (``per_draw_stats``, on the object or its kernel; a class attribute, so it is there when
    the chains ran in worker processes)."""
    for source in (obj, getattr(obj, "kernel", None)):
        names = getattr(source, "per_draw_stats", None)
        if names:
            return dict(names)
    return {}


def method_stats(obj, num_chains: int, num_draws: int) -> Tuple[Dict[str, np.ndarray], Dict[str, tuple]]:
    """The sampler's own statistics from ``obj.diagnostics()``, read by their shape.

    ``pyro.infer.MCMC`` and :class:`~pyro_subnet.infer.AnnealedSMC` both report
    ``{key: {"chain i": value}}`` (MCMC gathers it from the kernels, also from worker
    processes). Each key becomes

    * ``diverging`` (bool ``(chain, draw)``) for ``"divergences"`` (draw indices);
    * a ``(chain, draw)`` array for the keys declared in ``per_draw_stats`` (renamed as declared);
    * a per-chain scalar (``log_evidence``, ``final_ess``, ``acceptance_rate``) repeated over the
      draws, since ``sample_stats`` variables are ``(chain, draw)``;
    * any other per-chain series (SMC's per-step ESS, acceptance, data included) a
      ``(chain, step)`` array, NaN-padded to the longest chain, for the ``step_stats`` group.

    Keys without an entry per chain (Pyro's per-site ``n_eff``/``r_hat``) are skipped.

    :returns: ``(sample_stats, step_stats)``, the latter as ``{name: (dims, array)}``.
    """
    diag = obj.diagnostics() if callable(getattr(obj, "diagnostics", None)) else {}
    declared = _declared_per_draw(obj)
    chains = [f"chain {i}" for i in range(num_chains)]
    diverging = np.zeros((num_chains, num_draws), dtype=bool)
    stats, steps = {"diverging": diverging}, {}
    for key, by_chain in (diag or {}).items():
        if not (isinstance(by_chain, dict) and all(c in by_chain for c in chains)):
            continue
        values = [_numpy(by_chain[c]) for c in chains]
        if key == "divergences":
            for i, idx in enumerate(values):
                idx = idx.astype(int).reshape(-1)
                diverging[i, idx[idx < num_draws]] = True
        elif key in declared:
            a = np.stack([v.astype(float).reshape(-1) for v in values])
            if a.shape != (num_chains, num_draws):
                raise ValueError(f"to_inference_data: per-draw statistic {key!r} has shape {a.shape}, "
                                 f"expected (chains, draws) = {(num_chains, num_draws)}.")
            stats[declared[key]] = a
        elif all(v.ndim == 0 for v in values):
            stats[key.replace(" ", "_")] = np.repeat(np.stack(values)[:, None], num_draws, axis=1)
        else:
            length = max(v.size for v in values)
            a = np.full((num_chains, length), np.nan)
            for i, v in enumerate(values):
                a[i, :v.size] = v.astype(float).reshape(-1)
            steps[key.replace(" ", "_")] = (("chain", "step"), a)
    return stats, steps


def to_inference_data(obj, *args, num_samples: int = 100, num_chains: int = 2, model=None, **kwargs):
    """Convert a posterior to ArviZ data (see the module docstring).

    :param obj: ``pyro.infer.MCMC``, an MCMC-like object (``get_samples``, ``num_chains``,
        e.g. :class:`~pyro_subnet.infer.AnnealedSMC`), or a guide (any callable that samples the
        latent sites, e.g. an ``AutoGuide``).
    :param args: the model's arguments, e.g. ``(x, y)``, and keyword arguments ``kwargs``. For
        MCMC-like objects they default to those of the run.
    :param num_samples: draws per chain taken from a guide.
    :param num_chains: chains of independent guide draws (2 by default, so that R-hat is defined;
        for iid draws it should be 1 up to Monte Carlo error). MCMC-like objects keep their own.
    :param model: the model, for guides that do not carry it as ``guide.model``.

    >>> import arviz
    >>> model = ps.nn.BayesianNet(nn.Linear(2, 1), likelihood="regression", noise_scale=0.5)
    >>> x = torch.randn(40, 2); y = x @ torch.tensor([1.0, -1.0]) + 0.5 * torch.randn(40)
    >>> mcmc = pyro.infer.MCMC(ps.infer.SGHMC(model), num_samples=30, warmup_steps=30, num_chains=1,
    ...                        disable_progbar=True)
    >>> mcmc.run(x, y)
    >>> idata = ps.to_inference_data(mcmc)          # the data of the run; arviz.from_pyro(mcmc) works too
    >>> sorted(idata.groups())
    ['log_likelihood', 'observed_data', 'posterior', 'posterior_predictive', 'sample_stats']
    >>> idata.log_likelihood["obs"].shape
    (1, 30, 40)
    >>> loo = arviz.loo(idata)                      # elpd_loo, p_loo and the Pareto k per point
    """
    if _is_mcmc_like(obj):
        kernel = getattr(obj, "kernel", None)
        model = model or getattr(kernel, "model", None) or getattr(obj, "model", None)
        if not args and not kwargs:
            args, kwargs = getattr(obj, "_args", ()), getattr(obj, "_kwargs", {}) or {}
        num_chains = obj.num_chains
        draws = obj.get_samples(group_by_chain=False)
    else:
        # A guide whose predictive is not the model's own (a Laplace guide's linearised network)
        # says so with ``predictive_model``; the log-likelihood and LOO use it.
        model = model or getattr(obj, "predictive_model", None) or getattr(obj, "model", None)
        if model is None:
            raise ValueError("to_inference_data: pass model= for a guide that does not carry its model.")
        if not (isinstance(num_chains, int) and num_chains >= 1 and isinstance(num_samples, int)
                and num_samples >= 1):
            raise ValueError(f"to_inference_data: num_chains and num_samples must be positive integers, "
                             f"got {num_chains!r} and {num_samples!r}.")
        draws = _guide_draws(obj, num_chains * num_samples, args, kwargs)
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
    # lp is the exact full-data log joint; a sampler's own (mini-batch) lp is declared under another name.
    sampler, steps = method_stats(obj, num_chains, num_draws)
    stats = {"lp": _numpy(pw.log_joint).reshape(num_chains, num_draws), **sampler}
    groups = {"posterior": posterior, "sample_stats": stats, "log_likelihood": log_lik,
              "posterior_predictive": post_pred,
              "observed_data": {k: _numpy(v) for k, v in pw.observed.items()}}
    attrs = {"inference_library": "pyro_subnet", "method": type(obj).__name__}
    return from_groups(groups, attrs, extra={STEP_GROUP: steps})


def summary_numbers(data) -> Dict[str, float]:
    """A few numbers to print beside a method: smallest bulk ESS over every posterior scalar,
    largest rank R-hat (with two or more chains), the median and 10th percentile over training
    points of the bulk ESS of the pointwise log-likelihood (and the median and 90th percentile of
    its R-hat), ``elpd_loo`` and the fraction of Pareto ``k > 0.7`` (points whose LOO estimate is
    unreliable).

    >>> model = ps.nn.BayesianNet(nn.Linear(2, 1), likelihood="regression", noise_scale=0.5)
    >>> x = torch.randn(40, 2); y = x @ torch.tensor([1.0, -1.0]) + 0.5 * torch.randn(40)
    >>> guide = pyro.infer.autoguide.AutoNormal(model)      # two chains of its draws
    >>> idata = ps.to_inference_data(guide, x, y, num_samples=50)
    >>> sorted(ps.diagnostics.arviz_io.summary_numbers(idata))
    ['elpd_loo', 'ess_bulk_min', 'll_ess_bulk_median', 'll_ess_bulk_p10', 'll_r_hat_median', 'll_r_hat_p90', 'pareto_k_bad', 'r_hat_max']
    """
    import arviz as az
    post = data["posterior"]
    post = post.to_dataset() if hasattr(post, "children") else post
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # ArviZ warns about shapes and Pareto k; we report them
        ess = az.ess(post, method="bulk")
        out["ess_bulk_min"] = float(min(float(np.nanmin(v.values)) for v in ess.data_vars.values()))
        if post.sizes["chain"] > 1:
            rhat = az.rhat(post)
            out["r_hat_max"] = float(max(float(np.nanmax(v.values)) for v in rhat.data_vars.values()))
        # The weights of a network are symmetric (units can swap), so their ESS says little; the
        # pointwise log-likelihood is what predictions average, and its ESS and R-hat count.
        ll = data["log_likelihood"]
        ll = ll.to_dataset() if hasattr(ll, "children") else ll
        ll_ess = np.concatenate([np.ravel(v.values) for v in az.ess(ll, method="bulk").data_vars.values()])
        out["ll_ess_bulk_median"] = float(np.nanmedian(ll_ess))
        out["ll_ess_bulk_p10"] = float(np.nanpercentile(ll_ess, 10))
        if post.sizes["chain"] > 1:
            ll_rhat = np.concatenate([np.ravel(v.values) for v in az.rhat(ll).data_vars.values()])
            out["ll_r_hat_median"] = float(np.nanmedian(ll_rhat))
            out["ll_r_hat_p90"] = float(np.nanpercentile(ll_rhat, 90))
        loo = az.loo(data, reff=1.0 if post.sizes["chain"] == 1 else None)
        out["elpd_loo"] = float(loo.elpd_loo)
        out["pareto_k_bad"] = float((np.asarray(loo.pareto_k) > 0.7).mean())
    return out
