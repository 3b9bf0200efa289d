"""MAP weights under a prior chosen by the evidence: MacKay's evidence framework for a network.

A MAP found under a fixed prior :math:`\\mathcal{N}(0, \\alpha^{-1} I)` and the Laplace evidence
tuned afterwards disagree: the evidence picks its own :math:`\\alpha` for weights that were fitted
under another one. The evidence framework (MacKay, *A Practical Bayesian Framework for
Backpropagation Networks*, Neural Computation 1992) alternates the two until they agree,

.. math::

    \\hat\\theta_t = \\arg\\max_\\theta \\log p(\\theta \\mid \\alpha_{t}) + \\log p(y \\mid \\theta, \\sigma_t),
    \\qquad
    (\\alpha_{t+1}, \\sigma_{t+1}) = \\arg\\max_{\\alpha, \\sigma} \\log Z(\\alpha, \\sigma; \\hat\\theta_t),

with :math:`\\log Z` the linearised Laplace evidence at :math:`\\hat\\theta_t`
(:mod:`~pyro_subnet.infer.autoguide.prior`), each MAP warm-started from the last. A learned
noise scale is fitted jointly with the weights only in the first MAP; after that it is the
evidence's (fitted jointly with the weights, the noise shrinks towards the training residuals
and the network overfits: the MAP estimate of the noise is biased low). The online
variant of Immer et al., *Scalable Marginal Likelihood Estimation for Model Selection in Deep
Learning* (ICML 2021), interleaves the same two steps within one training run. It is type-II
maximum likelihood of the prior scale: the model's prior is *replaced* by the chosen one
(:meth:`~pyro_subnet.nn.BayesianNet.set_prior_scale`), so every method run on the model afterwards
(the Laplace guides, the samplers, SMC) uses it. Only the default Normal prior of a
:class:`~pyro_subnet.nn.BayesianNet` has a scale to choose; a model with priors of its own keeps
them (tune the Laplace posterior's precision with ``prior_precision="marglik"`` instead).
"""

from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional

import torch

from ..nn.bayesian_net import BayesianNet
from ..nn.validation import check_positive_int
from .autoguide.subnet_laplace import AutoSubnetLaplace
from .autoguide.subnet_selection import All, PredictiveVariance
from .map import fit_map

#: Networks up to this many weights get the exact (full-GGN) linearised evidence; larger ones the
#: evidence of a predictive-variance subnetwork of this size (Daxberger et al., 2021).
FULL_EVIDENCE_MAX_DIM = 2000


class EvidenceMAPResult(NamedTuple):
    theta: torch.Tensor                  # (D,) MAP weights under the final prior
    losses: torch.Tensor                 # the last MAP run's loss curve
    noise_scale: Optional[float]         # a learned noise scale: the last evidence update's
    prior_scale: float                   # the chosen prior standard deviation (also on the model)
    history: List[dict]                  # per round: prior_scale (the MAP's), log_evidence, noise_scale


def default_evidence_guide(model: BayesianNet) -> AutoSubnetLaplace:
    """The Laplace guide whose evidence chooses the prior: every weight up to
    :data:`FULL_EVIDENCE_MAX_DIM`, else a predictive-variance subnetwork of that size."""
    dim = model.layout.dim
    subnet = All() if dim <= FULL_EVIDENCE_MAX_DIM else PredictiveVariance(FULL_EVIDENCE_MAX_DIM)
    return AutoSubnetLaplace(model, subnet=subnet, prior_precision="marglik", progress=False)


def fit_map_by_evidence(model: BayesianNet, x, y, rounds: int = 4, tol: float = 0.02,
                        num_steps: int = 2000, refit_steps: Optional[int] = None,
                        evidence_guide: Callable[[BayesianNet], AutoSubnetLaplace] = default_evidence_guide,
                        progress: bool = True, **map_kwargs) -> EvidenceMAPResult:
    """MAP weights and a prior scale that the linearised Laplace evidence agrees with (module docstring).

    :param model: a :class:`~pyro_subnet.nn.BayesianNet` with the default Normal prior; its prior
        scale is set to the chosen one (a learned noise scale to the evidence's).
    :param rounds: at most this many evidence updates after the first MAP (each followed by a MAP refit).
    :param tol: stop when the prior scale changes by less than this fraction in a round.
    :param num_steps: Adam steps of the first MAP.
    :param refit_steps: Adam steps of each warm-started refit (default ``num_steps``).
    :param evidence_guide: ``model -> unfitted Laplace guide`` with ``prior_precision="marglik"``
        (default :func:`default_evidence_guide`).
    :param map_kwargs: passed to :func:`~pyro_subnet.infer.fit_map` (``lr``, ``batch_size``, ``seed``).
    :returns: :class:`EvidenceMAPResult`.

    >>> from torch import nn
    >>> from pyro_subnet.nn import BayesianNet
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> x = torch.randn(100, 3); y = x @ torch.tensor([0.3, -0.2, 0.1]) + 0.1 * torch.randn(100)
    >>> model = BayesianNet(nn.Linear(3, 1), likelihood="regression", prior_scale=10.0, noise_scale=None)
    >>> result = ps.infer.fit_map_by_evidence(model, x, y, num_steps=500, lr=0.05, progress=False)
    >>> 0.1 < result.prior_scale < 1.0, model.prior_scale == result.prior_scale
    (True, True)
    """
    if not isinstance(model, BayesianNet):
        raise ValueError("fit_map_by_evidence chooses the scale of a BayesianNet's default Normal prior; a model "
                         "with priors of its own keeps them. Use fit_map, and prior_precision='marglik' in the Laplace guides.")
    model.set_prior_scale(model.prior_scale)          # refuses a prior that is not the default Normal one
    check_positive_int(rounds, "rounds")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a non-negative number, got {tol!r}.")
    refit_steps = num_steps if refit_steps is None else check_positive_int(refit_steps, "refit_steps")
    scale = float(model.prior_precision().mean()) ** -0.5
    fit = fit_map(model, x, y, num_steps=num_steps, progress=progress, **map_kwargs)
    history = []
    for _ in range(rounds):
        guide = evidence_guide(model).fit(x, y, map_theta=fit.theta)
        new_scale = float(guide.prior_prec.mean()) ** -0.5
        history.append({"prior_scale": scale, "log_evidence": float(guide.log_marginal_likelihood()),
                        "noise_scale": model.noise_scale})
        if not math.isfinite(new_scale):
            raise RuntimeError(f"fit_map_by_evidence: the evidence's prior precision is not finite "
                               f"({float(guide.prior_prec.mean())!r}); the MAP may not have converged (raise num_steps).")
        change = abs(new_scale / scale - 1.0)
        scale = new_scale
        model.set_prior_scale(scale)
        # The noise stays at the evidence's value: refitted jointly with the weights it shrinks
        # towards the training residuals and the network overfits (the MAP's noise is biased low).
        fit = fit_map(model, x, y, num_steps=refit_steps, init=fit.theta, progress=progress, fit_noise=False,
                      **map_kwargs)
        if change < tol:
            break
    return EvidenceMAPResult(fit.theta, fit.losses, fit.noise_scale, scale, history)
