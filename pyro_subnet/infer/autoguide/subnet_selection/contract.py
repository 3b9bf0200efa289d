"""The selection contract, candidate weights, and sizes given as memory budgets.

A strategy maps ``(model, MAP weights, training data)`` to ``k`` distinct indices into the flat
weight vector (``model.layout`` order), sorted. Candidates exclude normalisation-layer
parameters by default: they are scale parameters of a normalised layer, not weights whose
uncertainty the linearised model describes well (Daxberger et al. exclude BatchNorm; Antorán et
al., ICML 2022, treat normalised layers apart).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Optional, Union

import torch
from torch import nn

from ....data.batches import example_inputs
from ....nn.bridge import ModelBridge

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20,
          "GIB": 2 ** 30}
# Dense k x k matrices a guide keeps: the GGN, the Cholesky factor, and one during factorisation.
MATRICES_PER_SUBNET = 3


def model_view(model, data=None):
    """What the strategies read: a :class:`~pyro_subnet.nn.ModelBridge` as given; a model with a
    flat layout of its own (:class:`~pyro_subnet.nn.BayesianNet`) for the strategies that need no
    data; else the bridge of ``model`` on the training inputs."""
    if isinstance(model, ModelBridge):
        return model
    if data is not None:
        return ModelBridge(model, example_inputs(data))
    if hasattr(model, "layout") and hasattr(model, "network"):
        return model
    raise ValueError("subnetwork selection needs the model's bridge (ps.nn.ModelBridge(model, x)) or the training "
                     "data, to find the model's weight sites.")


def parse_memory(spec: Union[str, int, float]) -> int:
    """``"200MB"``, ``"1.5GiB"``, ``2e8`` -> bytes."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if spec <= 0:
            raise ValueError(f"max_memory must be positive, got {spec!r}.")
        return int(spec)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(spec))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max_memory: cannot read {spec!r}; write e.g. '200MB', '1GB' or '512MiB'.")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def k_from_memory(max_memory, dtype=torch.float32) -> int:
    """The largest ``k`` whose dense ``k x k`` matrices (:data:`MATRICES_PER_SUBNET` of them)
    fit in ``max_memory``."""
    item = torch.empty((), dtype=dtype).element_size()
    return int(math.isqrt(parse_memory(max_memory) // (MATRICES_PER_SUBNET * item)))


def normalisation_sites(model) -> set:
    """Names of weight sites that belong to normalisation layers of the network (``model.network.module``)."""
    net = getattr(getattr(model, "network", None), "module", None)
    if net is None:
        return set()
    prefixes = [name + "." if name else "" for name, m in net.named_modules() if isinstance(m, _NORM_TYPES)]
    return {s for s in model.layout.names if any(s.startswith(p) and "." not in s[len(p):] for p in prefixes)}


def candidates(model, exclude_normalisation: bool = True, device=None) -> torch.Tensor:
    """Boolean mask ``(D,)`` of the weights a strategy may choose."""
    layout = model.layout
    mask = torch.ones(layout.dim, dtype=torch.bool, device=device)
    if exclude_normalisation:
        for name in normalisation_sites(model):
            mask[layout.slice(name)] = False
    return mask


def warn_if_flat(ggn_diag: torch.Tensor, prior_prec: torch.Tensor, rtol: float = 1e-6) -> bool:
    """Warn when the GGN over the chosen weights is nearly zero (the data do not constrain
    them, so their posterior is the prior and they carry no predictive variance on the data)."""
    flat = bool(ggn_diag.sum() <= rtol * prior_prec.sum())
    if flat:
        warnings.warn(
            "The GGN over the selected subnetwork is nearly zero (trace "
            f"{float(ggn_diag.sum()):.3g} against a prior precision trace {float(prior_prec.sum()):.3g}): "
            "the data barely move these weights, so the subnetwork posterior is about the prior and "
            "its predictive variance is about zero. Choose weights that matter to the outputs, e.g. "
            "ps.subnet.PredictiveVariance(k) or LargestVariance(k, method='swag').",
            RuntimeWarning, stacklevel=3)
    return flat


class SubnetSelection:
    """Base class of the selection strategies.

    :param k: number of weights (or give ``max_memory``).
    :param max_memory: memory budget for the dense subnetwork matrices, e.g. ``"200MB"``.
    :param exclude_normalisation: leave normalisation-layer parameters out.
    """

    def __init__(self, k: Optional[int] = None, max_memory=None, exclude_normalisation: bool = True):
        if k is not None and max_memory is not None:
            raise ValueError("give either k or max_memory, not both.")
        if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k > 0):
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        self.k = k
        self.max_memory = max_memory
        self.exclude_normalisation = exclude_normalisation

    def resolve_k(self, num_candidates: int, dtype=torch.float32) -> int:
        if self.k is None and self.max_memory is None:
            raise ValueError(f"{type(self).__name__}: give k= or max_memory=.")
        k = self.k if self.k is not None else min(k_from_memory(self.max_memory, dtype), num_candidates)
        if k > num_candidates:
            raise ValueError(f"{type(self).__name__}: k={k} exceeds the {num_candidates} candidate weights.")
        if k < 1:
            raise ValueError(f"{type(self).__name__}: max_memory={self.max_memory!r} is too small for one weight.")
        return k

    def select(self, model, theta: torch.Tensor, data=None, prior_precision: Optional[torch.Tensor] = None,
               progress: bool = False) -> torch.Tensor:
        """Sorted LongTensor of ``k`` distinct flat indices.

        :param model: the model's :class:`~pyro_subnet.nn.ModelBridge` (or anything with
            ``layout``, ``network``, ``likelihood`` and ``prior_precision``, e.g. a
            :class:`~pyro_subnet.nn.BayesianNet`).
        :param theta: MAP weights ``(D,)``.
        :param data: training data: ``(x, y)`` tensors or a DataLoader.
        :param prior_precision: ``(D,)`` prior precision (default: the model's).
        """
        model = model_view(model, data)
        mask = candidates(model, self.exclude_normalisation, device=theta.device)
        if prior_precision is None:
            prior_precision = model.prior_precision(dtype=theta.dtype, device=theta.device)
        k = self.resolve_k(int(mask.sum()), theta.dtype)
        idx = self._select(model, theta.detach(), data, mask, k, prior_precision, progress)
        return torch.sort(idx.to(torch.long)).values

    def _select(self, model, theta, data, mask, k, prior_precision, progress) -> torch.Tensor:
        scores = self.scores(model, theta, data, prior_precision, progress)
        scores = torch.where(mask, scores, torch.full_like(scores, -math.inf))
        return torch.topk(scores, k).indices

    def scores(self, model, theta, data, prior_precision, progress=False) -> torch.Tensor:
        """Per-weight scores ``(D,)``; the ``k`` largest are chosen."""
        raise NotImplementedError

    def __repr__(self):
        size = f"k={self.k}" if self.k is not None else f"max_memory={self.max_memory!r}"
        return f"{type(self).__name__}({size})"
