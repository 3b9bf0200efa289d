"""Prior precision over the subnetwork: how it is given, the Laplace evidence, and its tuning.

The prior over the ``k`` subnetwork weights is :math:`\\mathcal{N}(0, P_0^{-1})` with diagonal
:math:`P_0 = \\mathrm{diag}(p)`, where ``p`` is one number (``"scalar"``), one number per weight
site (``"layerwise"``) or one per weight (``"diag"``). With the GGN :math:`G` over the subnetwork
at the MAP :math:`\\hat\\theta`, the linearised Laplace evidence is (MacKay, 1992; Immer et al., 2021)

.. math::

    \\log Z(p) \\approx \\log p(y \\mid \\hat\\theta) - \\tfrac12 \\hat\\theta_S^\\top P_0 \\hat\\theta_S
       + \\tfrac12 \\log\\det P_0 - \\tfrac12 \\log\\det(G + P_0),

exact for a linear-Gaussian model evaluated at its posterior mean. Two ways to tune ``p``:

* ``"marglik"``: maximise :math:`\\log Z` over :math:`\\log p` (L-BFGS);
* ``"em"``: the fixed-point (MacKay / EM) update of Antorán et al. (ICML 2022, ICLR 2023),
  :math:`p_g \\leftarrow \\gamma_g / \\|\\hat\\theta_g\\|^2` with the effective number of parameters
  :math:`\\gamma_g = \\sum_{i \\in g} (1 - p_i \\Sigma_{ii})`, whose fixed points are the
  stationary points of :math:`\\log Z` (:func:`tune_em` from a dense posterior,
  :func:`tune_em_diagonal` from a diagonal one). :func:`mackay_update` is the bare update, which a
  sample-based guide can feed with estimated :math:`\\gamma` instead.
"""

from __future__ import annotations

import fnmatch
import math
from numbers import Number
from typing import Mapping, Optional, Tuple

import torch

from .cholesky import cholesky

STRUCTURES = ("scalar", "layerwise", "diag")
TUNERS = ("marglik", "em", "validation")   # validation: the guides' grid search on held-out data
_LOG_MIN, _LOG_MAX = math.log(1e-8), math.log(1e8)


def site_groups(layout, indices: torch.Tensor) -> torch.Tensor:
    """Position of each index's weight site in ``layout.names``, shape ``(k,)``."""
    out = torch.empty(len(indices), dtype=torch.long, device=indices.device)
    names = layout.names
    for name, positions, _ in layout.locate(indices):
        out[positions.to(indices.device)] = names.index(name)
    return out


def structure_groups(structure: str, layout, indices: torch.Tensor) -> torch.Tensor:
    """Group id ``(k,)`` of every subnetwork weight under a prior ``structure``
    (ids are ``0 .. G-1``)."""
    if structure == "scalar":
        return torch.zeros(len(indices), dtype=torch.long, device=indices.device)
    if structure == "layerwise":
        return torch.unique(site_groups(layout, indices), return_inverse=True)[1]
    if structure == "diag":
        return torch.arange(len(indices), device=indices.device)
    raise ValueError(f"prior_structure must be one of {STRUCTURES}, got {structure!r}.")


def expand_prior_precision(spec, layout, indices: torch.Tensor, default: torch.Tensor) -> torch.Tensor:
    """The prior precision of every subnetwork weight, shape ``(k,)``.

    :param spec: ``None`` (``default``, the model's own prior); a positive number; a dict from
        site-name patterns (``fnmatch``) to numbers (per layer, first match wins); or a tensor
        of shape ``()`` or ``(k,)`` (per weight).
    :param default: ``(k,)`` precisions to use for ``None``.
    """
    k = len(indices)
    if spec is None:
        p = default
    elif isinstance(spec, Number) and not isinstance(spec, bool):
        p = torch.full((k,), float(spec), dtype=default.dtype, device=default.device)
    elif isinstance(spec, Mapping):
        per_site = []
        for name in layout.names:
            for pattern, value in spec.items():
                if fnmatch.fnmatchcase(name, pattern):
                    per_site.append(float(value))
                    break
            else:
                per_site.append(float("nan"))
        per_site = torch.tensor(per_site, dtype=default.dtype, device=default.device)
        p = per_site[site_groups(layout, indices)]
        if torch.isnan(p).any():
            missing = sorted({layout.names[i] for i in site_groups(layout, indices)[torch.isnan(p)].tolist()})
            raise ValueError(f"prior_precision: no pattern matches the sites {missing}; add a '*' entry.")
    elif isinstance(spec, torch.Tensor):
        p = spec.to(dtype=default.dtype, device=default.device)
        if p.dim() == 0:
            p = p.expand(k).clone()
        elif p.shape != (k,):
            raise ValueError(f"prior_precision: a tensor must have shape () or (k,) = ({k},), got {tuple(p.shape)}.")
    else:
        raise ValueError(
            "prior_precision must be None, a positive number, a dict of site patterns to numbers, a "
            f"tensor of shape () or (k,), 'marglik' or 'em'; got {spec!r}."
        )
    if not (torch.isfinite(p).all() and (p > 0).all()):
        raise ValueError("prior_precision must be positive and finite everywhere.")
    return p


def log_evidence(log_lik: torch.Tensor, theta_s: torch.Tensor, prior_prec: torch.Tensor,
                 ggn: torch.Tensor) -> torch.Tensor:
    """The linearised Laplace evidence :math:`\\log Z` (module docstring); differentiable in
    ``prior_prec``. A 1-D ``ggn`` is a diagonal GGN (the diagonal Laplace evidence)."""
    if ggn.dim() == 1:
        logdet_post = torch.log(ggn + prior_prec).sum()
    else:
        precision = ggn + torch.diag(prior_prec)
        L, info = torch.linalg.cholesky_ex(precision)
        if int(info) != 0 and precision.dtype != torch.float64:   # beyond float32's condition numbers
            L, info = torch.linalg.cholesky_ex(precision.double())
        if int(info) != 0:   # not positive definite: -inf, still a function of the inputs so that a tuner's backward runs
            return log_lik + prior_prec.sum() * 0.0 - math.inf
        logdet_post = 2.0 * torch.log(torch.diagonal(L)).sum().to(precision.dtype)
    return log_lik - 0.5 * (prior_prec * theta_s ** 2).sum() + 0.5 * torch.log(prior_prec).sum() - 0.5 * logdet_post


def _lbfgs_maximise(params, objective, max_iter: int) -> None:
    """Maximise ``objective()`` over ``params`` in place (L-BFGS, strong Wolfe), robust to probes
    where it is not finite (an unfactorisable precision at an extreme step): such a probe gets a
    huge finite loss and no gradient, so the line search backs off instead of turning the
    iterate into NaN, and the best finite point seen is kept."""
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)
    best = {"loss": math.inf, "values": [q.detach().clone() for q in params]}

    def closure():
        opt.zero_grad()
        loss = -objective()
        if not torch.isfinite(loss):
            for q in params:
                q.grad = torch.zeros_like(q)
            return torch.full_like(loss.detach(), 1e30)
        loss.backward()
        value = float(loss.detach())
        if value < best["loss"]:
            best["loss"], best["values"] = value, [q.detach().clone() for q in params]
        return loss

    opt.step(closure)
    with torch.no_grad():
        for q, v in zip(params, best["values"]):
            q.copy_(v)


def tune_marglik(ggn: torch.Tensor, theta_s: torch.Tensor, groups: torch.Tensor, init: torch.Tensor,
                 max_iter: int = 200) -> torch.Tensor:
    """Maximise :math:`\\log Z` over one log-precision per group (L-BFGS, strong Wolfe).

    :param groups: ``(k,)`` group ids from :func:`structure_groups`.
    :param init: ``(k,)`` starting precisions (averaged within groups).
    :returns: ``(k,)`` tuned precisions.
    """
    num = int(groups.max()) + 1
    start = torch.zeros(num, dtype=init.dtype, device=init.device).index_add_(0, groups, init.log())
    start = start / torch.bincount(groups, minlength=num).to(init.dtype)
    # The optimiser works in float64: the log-determinant of a k x k matrix needs the digits.
    G, th = ggn.detach().double(), theta_s.detach().double()
    log_p = start.double().clone().requires_grad_(True)
    zero = torch.zeros((), dtype=G.dtype, device=G.device)
    _lbfgs_maximise([log_p], lambda: log_evidence(zero, th, log_p.clamp(_LOG_MIN, _LOG_MAX).exp()[groups], G), max_iter)
    return log_p.detach().clamp(_LOG_MIN, _LOG_MAX).exp()[groups].to(init.dtype)


def mackay_update(theta_sq: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """One EM / MacKay update per group: :math:`p_g = \\gamma_g / \\|\\hat\\theta_g\\|^2`.

    :param theta_sq: ``(G,)`` sums of squared weights per group.
    :param gamma: ``(G,)`` effective numbers of parameters per group (exact, or estimated from
        samples by a sample-based guide).
    """
    p = gamma.clamp_min(1e-12) / theta_sq.clamp_min(1e-12)
    return p.clamp(math.exp(_LOG_MIN), math.exp(_LOG_MAX))


def tune_em(ggn: torch.Tensor, theta_s: torch.Tensor, groups: torch.Tensor, init: torch.Tensor,
            max_iter: int = 500, rtol: float = 1e-7) -> torch.Tensor:
    """Iterate :func:`mackay_update` with exact :math:`\\gamma` from the dense posterior.

    :returns: ``(k,)`` tuned precisions.
    """
    num = int(groups.max()) + 1
    G, th = ggn.detach().double(), theta_s.detach().double()
    theta_sq = torch.zeros(num, dtype=G.dtype, device=G.device).index_add_(0, groups, th ** 2)
    p = init.detach().double().clone()
    for _ in range(max_iter):
        Sigma_diag = torch.diagonal(torch.cholesky_inverse(cholesky(G + torch.diag(p))))
        gamma = torch.zeros(num, dtype=G.dtype, device=G.device).index_add_(0, groups, 1.0 - p * Sigma_diag)
        new = mackay_update(theta_sq, gamma)[groups]
        converged = ((new - p).abs() <= rtol * p).all()
        p = new
        if converged:
            break
    return p.to(init.dtype)


# ----------------------------------------------------------------------------------------------
# Learned Gaussian observation noise. With y_n ~ N(f_n, sigma^2 I_O) the GGN is G = G_1 / sigma^2
# (G_1 the GGN at sigma = 1) and the log-likelihood at the MAP is
# -SSE / (2 sigma^2) - M log sigma - M/2 log 2 pi (M = N O observed numbers), so the evidence is a
# closed-form function of (p, sigma) once G_1 and the SSE are known.
def log_evidence_noise(sse: torch.Tensor, num_obs: int, theta_s: torch.Tensor, prior_prec: torch.Tensor,
                       ggn1: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """:math:`\\log Z(p, \\sigma)` of the module docstring with the Gaussian log-likelihood
    written out: ``ggn1`` is the GGN at unit noise, ``sse`` the residual sum of squares at the
    MAP and ``num_obs`` the number of observed values; differentiable in ``prior_prec`` and
    ``log_sigma``."""
    var = torch.exp(2 * log_sigma)
    log_lik = -0.5 * sse / var - num_obs * (log_sigma + 0.5 * math.log(2 * math.pi))
    return log_evidence(log_lik, theta_s, prior_prec, ggn1 / var)


def tune_marglik_noise(ggn1: torch.Tensor, theta_s: torch.Tensor, groups: torch.Tensor, init: torch.Tensor,
                       sse: float, num_obs: int, init_scale: float, tune_prior: bool = True,
                       max_iter: int = 200):
    """Maximise :math:`\\log Z(p, \\sigma)` jointly over one log-precision per group and the
    log noise scale (L-BFGS, float64), as :func:`tune_marglik` does for ``p`` alone (Immer et al.,
    *Scalable marginal likelihood estimation for model selection in deep learning*, ICML 2021).

    :param ggn1: ``(k, k)`` GGN at unit noise, or ``(k,)`` its diagonal (diagonal Laplace).
    :param sse: residual sum of squares at the MAP.
    :param num_obs: number of observed values ``N O``.
    :param init_scale: starting noise scale.
    :param tune_prior: ``False`` keeps ``init`` and tunes the noise only.
    :returns: ``((k,) precisions, noise scale)``.
    """
    num = int(groups.max()) + 1
    start = torch.zeros(num, dtype=init.dtype, device=init.device).index_add_(0, groups, init.log())
    start = start / torch.bincount(groups, minlength=num).to(init.dtype)
    G, th = ggn1.detach().double(), theta_s.detach().double()
    sse_t = torch.as_tensor(float(sse), dtype=G.dtype, device=G.device)
    log_p = start.double().clone().requires_grad_(tune_prior)
    log_s = torch.tensor(math.log(init_scale), dtype=G.dtype, device=G.device, requires_grad=True)
    _lbfgs_maximise([log_p, log_s] if tune_prior else [log_s],
                    lambda: log_evidence_noise(sse_t, num_obs, th, log_p.clamp(_LOG_MIN, _LOG_MAX).exp()[groups], G,
                                               log_s.clamp(-12.0, 12.0)), max_iter)
    p = log_p.detach().clamp(_LOG_MIN, _LOG_MAX).exp()[groups].to(init.dtype)
    return p, float(log_s.detach().clamp(-12.0, 12.0).exp())


def tune_em_noise(ggn1: torch.Tensor, theta_s: torch.Tensor, groups: torch.Tensor, init: torch.Tensor,
                  sse: float, num_obs: int, init_scale: float, tune_prior: bool = True,
                  max_iter: int = 500, rtol: float = 1e-7):
    """MacKay's fixed-point updates for the prior precision and the noise together:
    :math:`p_g = \\gamma_g / \\|\\hat\\theta_g\\|^2` and
    :math:`\\sigma^2 = \\mathrm{SSE} / (M - \\gamma)` with
    :math:`\\gamma = \\sum_i (1 - p_i \\Sigma_{ii})` (MacKay, 1992, eq. 4.23-4.24).

    :returns: ``((k,) precisions, noise scale)``.
    """
    num = int(groups.max()) + 1
    G1, th = ggn1.detach().double(), theta_s.detach().double()
    theta_sq = torch.zeros(num, dtype=G1.dtype, device=G1.device).index_add_(0, groups, th ** 2)
    p = init.detach().double().clone()
    var = float(init_scale) ** 2
    for _ in range(max_iter):
        Sigma_diag = torch.diagonal(torch.cholesky_inverse(cholesky(G1 / var + torch.diag(p))))
        gamma = torch.zeros(num, dtype=G1.dtype, device=G1.device).index_add_(0, groups, 1.0 - p * Sigma_diag)
        new = mackay_update(theta_sq, gamma)[groups] if tune_prior else p
        new_var = float(sse) / max(num_obs - float(gamma.sum()), 1.0)
        converged = ((new - p).abs() <= rtol * p).all() and abs(new_var - var) <= rtol * var
        p, var = new, max(new_var, 1e-12)
        if converged:
            break
    return p.to(init.dtype), math.sqrt(var)


def tune_em_diagonal(ggn1: torch.Tensor, theta: torch.Tensor, groups: torch.Tensor, init: torch.Tensor,
                     sse: Optional[float] = None, num_obs: int = 0, init_scale: float = 1.0,
                     tune_prior: bool = True, max_iter: int = 500, rtol: float = 1e-7) -> Tuple[torch.Tensor, float]:
    """MacKay's fixed-point (EM) updates for a diagonal Laplace posterior, where
    :math:`\\Sigma_{ii} = 1 / (g_i + p_i)` makes the effective number of parameters a sum,
    :math:`\\gamma_g = \\sum_{i \\in g} g_i / (g_i + p_i)`:
    :math:`p_g \\leftarrow \\gamma_g / \\|\\hat\\theta_g\\|^2` (:func:`mackay_update`) and, given
    ``sse``, the Gaussian noise :math:`\\sigma^2 \\leftarrow \\mathrm{SSE} / (M - \\gamma)` with
    :math:`g = g_1 / \\sigma^2` (MacKay, 1992, eq. 4.23-4.24). The diagonal counterpart of
    :func:`tune_em` / :func:`tune_em_noise`, in ``O(D)`` per step.

    :param ggn1: ``(D,)`` GGN diagonal (at unit noise when ``sse`` is given).
    :param theta: ``(D,)`` MAP weights.
    :param groups: ``(D,)`` group ids from :func:`structure_groups`.
    :param init: ``(D,)`` starting precisions.
    :param sse: residual sum of squares at the MAP, to tune the noise too (``None``: fixed noise).
    :param num_obs: number of observed values ``M = N O``.
    :param init_scale: starting noise scale.
    :param tune_prior: ``False`` keeps ``init`` and tunes the noise only.
    :returns: ``((D,) precisions, noise scale)`` (the scale is ``init_scale`` when ``sse`` is ``None``).
    """
    num = int(groups.max()) + 1
    g1, th = ggn1.detach().double(), theta.detach().double()
    zeros = lambda: torch.zeros(num, dtype=g1.dtype, device=g1.device)  # noqa: E731
    theta_sq = zeros().index_add_(0, groups, th ** 2)
    p = init.detach().double().clone()
    var = float(init_scale) ** 2
    for _ in range(max_iter):
        g = g1 / var if sse is not None else g1
        gamma = zeros().index_add_(0, groups, g / (g + p))
        new = mackay_update(theta_sq, gamma)[groups] if tune_prior else p
        new_var = float(sse) / max(num_obs - float(gamma.sum()), 1.0) if sse is not None else var
        converged = bool(((new - p).abs() <= rtol * p).all()) and abs(new_var - var) <= rtol * var
        p, var = new, max(new_var, 1e-12)
        if converged:
            break
    return p.to(init.dtype), math.sqrt(var)
