"""Pointwise log-likelihoods and predictive draws of a Pyro model at posterior draws.

ArviZ's LOO needs ``log p(y_n | theta_s)`` for every draw ``s`` and observation ``n``. Pyro's
``Predictive(parallel=True)`` gets it only from *batch-aware* models; a network built from
``PyroModule[nn.Linear]`` is not one (``F.linear`` rejects 3-D weights), and ``arviz.from_pyro``
then silently drops the ``log_likelihood`` group. Here the model is traced once per draw *inside*
``torch.func.vmap`` (with Pyro's validation off, whose data-dependent checks ``vmap`` cannot
trace), so every model gets its pointwise log-likelihood in one vectorised pass, and batch-aware
ones take Pyro's own vectorised route.

Mini-batched models (a ``pyro.plate`` with ``subsample_size``) are evaluated on all the data:
every subsample site is conditioned on the full index set.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.func import vmap


class PointwiseResult(NamedTuple):
    log_likelihood: Dict[str, torch.Tensor]        # obs site -> (S, *obs_shape)
    posterior_predictive: Dict[str, torch.Tensor]  # obs site -> (S, *obs_shape)
    log_joint: torch.Tensor                         # (S,) log p(theta_s, y)
    observed: Dict[str, torch.Tensor]              # obs site -> observed value
    draws: Dict[str, torch.Tensor]                  # latent site -> (S, *site_shape)


def unwrap_model(model):
    """The user's model under the handler wrappers AutoGuides put around it (``InitMessenger``)."""
    seen = 0
    while seen < 10 and hasattr(model, "func") and getattr(model.func, "args", None):
        inner = model.func.args[-1]
        if not callable(inner):
            break
        model, seen = inner, seen + 1
    return model


def full_data(model, *args, **kwargs):
    """``model`` evaluated on all of its data, and one trace of it.

    A model with a mini-batched plate offers a full-data view through
    ``with_subsample_size(None)`` (as :class:`~pyro_subnet.nn.BayesianNet` does); any other
    mini-batched model is refused with the fix, since Pyro cannot widen a subsampled plate from
    outside.
    """
    model = unwrap_model(model)
    trace = poutine.trace(model).get_trace(*args, **kwargs)
    sub = [n for n, s in trace.nodes.items() if s["type"] == "sample" and site_is_subsample(s)
           and s["value"].shape[0] != s["fn"].size]
    if not sub:
        return model, trace
    if hasattr(model, "with_subsample_size"):
        model = model.with_subsample_size(None)
        return model, poutine.trace(model).get_trace(*args, **kwargs)
    raise ValueError(
        f"the model subsamples plate(s) {sub}, so its log-likelihood would cover one mini-batch "
        "only. Pass model= a version of it without subsample_size."
    )


def latent_sites(trace) -> Dict[str, torch.Tensor]:
    return {n: s["value"] for n, s in trace.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}


def observed_sites(trace) -> Dict[str, torch.Tensor]:
    return {n: s["value"] for n, s in trace.nodes.items()
            if s["type"] == "sample" and s["is_observed"] and not site_is_subsample(s)
            and not s["infer"].get("_deterministic", False)}


def pointwise(model, draws: Dict[str, torch.Tensor], *args, **kwargs) -> PointwiseResult:
    """Evaluate ``model(*args, **kwargs)`` at every posterior draw.

    :param draws: latent site -> ``(S, *site_shape)`` (leading singleton plate dims allowed).
    """
    model, trace = full_data(model, *args, **kwargs)
    observed = observed_sites(trace)
    if not observed:
        raise ValueError("to_inference_data: the model has no observed site; pass the data (y) too.")
    shapes = {n: v.shape for n, v in latent_sites(trace).items()}
    missing = [n for n in shapes if n not in draws]
    if missing:
        raise ValueError(f"to_inference_data: no draws for latent sites {missing}.")
    num = next(iter(draws.values())).shape[0]
    flat = {n: draws[n].reshape(num, *shapes[n]) for n in shapes}

    def one(draw):
        with pyro.validation_enabled(False):
            tr = poutine.trace(poutine.condition(model, draw)).get_trace(*args, **kwargs)
        lls, preds = {}, {}
        lj = 0.0
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            lp = site["fn"].log_prob(site["value"])
            if name in observed:
                lls[name] = lp
                preds[name] = site["fn"].sample()
            lj = lj + lp.sum()
        return lls, preds, lj

    with torch.no_grad():
        try:
            lls, preds, lj = vmap(one, randomness="different")(flat)
        except Exception:  # a model vmap cannot trace (e.g. data-dependent Python control flow)
            outs = [one({n: v[s] for n, v in flat.items()}) for s in range(num)]
            lls = {k: torch.stack([o[0][k] for o in outs]) for k in observed}
            preds = {k: torch.stack([o[1][k] for o in outs]) for k in observed}
            lj = torch.stack([torch.as_tensor(o[2]) for o in outs])
    return PointwiseResult(lls, preds, lj, observed, flat)


def split_chains(values: torch.Tensor, num_chains: int) -> torch.Tensor:
    """``(C * S, ...)`` -> ``(C, S, ...)``."""
    return values.reshape(num_chains, values.shape[0] // num_chains, *values.shape[1:])


def group_by_chain(draws: Dict[str, torch.Tensor], num_chains: int) -> Tuple[Dict[str, torch.Tensor], int]:
    num = next(iter(draws.values())).shape[0]
    return {k: split_chains(v, num_chains) for k, v in draws.items()}, num // num_chains
