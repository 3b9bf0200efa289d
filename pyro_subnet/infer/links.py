"""Output links: class probabilities from the mean and (co)variance of Gaussian logits.

Every predictive that ends in Gaussian logits :math:`f \\sim \\mathcal N(\\mu, \\Sigma)` (the
linearised Laplace guides, the analytic predictive) turns them into class probabilities
:math:`\\mathbb E[\\mathrm{softmax}(f)]` here:

* :func:`probit`: MacKay's (1992) probit approximation from the variances alone,
  :math:`\\mathrm{softmax}(\\mu / \\sqrt{1 + \\tfrac{\\pi}{8} v})` (for one Bernoulli logit
  :math:`\\sigma(\\mu / \\sqrt{1 + \\tfrac{\\pi}{8} v})`, the standard approximation of the two-class
  integral); it depends on how the logits are shifted, since it counts the variance along the
  all-ones direction that softmax ignores;
* :func:`gumbel_max_softmax`: a multinomial probit with Clark's moments of a maximum, from the full
  covariance between the logits; unaffected by a common shift of the logits, and close to Monte
  Carlo (``tests/infer/test_analytic_layer_moments.py``);
* :func:`sobol_softmax`: quasi-Monte Carlo over the logits alone (a fixed scrambled Sobol rule),
  from the full covariance; converges to the Gaussian integral itself, at ``S C^2`` operations per
  example;
* :func:`probabilities`: softmax of logits, or the two columns of one Bernoulli logit.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

_SQRT_HALF = 0.5 ** 0.5
_LOG_INV_SQRT_2PI = -0.5 * math.log(2 * math.pi)
_CONSTANTS = {}


def _constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-dim tensor of ``like``'s dtype and device (cached), where an op needs a tensor
    operand (e.g. the first of ``addcmul``, saving the separate op a Python number would take)."""
    key = (value, like.dtype, like.device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]


def softmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(x, -1)``, written out: on CPU ``torch.softmax`` over a short last dimension
    (attention over a few tokens, ten classes) is several times slower than these four operations
    (``docs/measured.md``)."""
    e = (x - x.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


def probabilities(logits: torch.Tensor, binary: bool = False) -> torch.Tensor:
    """Class probabilities ``(..., C)`` from logits: ``softmax``, or for one Bernoulli logit
    (``binary``, logits ``(..., 1)``) the two columns ``(1 - sigmoid, sigmoid)``."""
    if binary:
        p = torch.sigmoid(logits[..., 0])
        return torch.stack([1 - p, p], -1)
    return torch.softmax(logits, dim=-1)


def probit(mean: torch.Tensor, var: torch.Tensor, binary: bool = False) -> torch.Tensor:
    """Class probabilities by the probit approximation,
    :math:`\\mathrm{softmax}(\\mu / \\sqrt{1 + \\tfrac{\\pi}{8} v})` (MacKay, 1992; uses the
    variances of the logits; ``binary``: one Bernoulli logit, two columns)."""
    scaled = mean / torch.sqrt(1 + torch.pi / 8 * var)
    return probabilities(scaled, True) if binary else softmax(scaled)


GUMBEL_VAR = torch.pi ** 2 / 6


def _clark(ma: torch.Tensor, sa: torch.Tensor, mb: torch.Tensor, sb: torch.Tensor, cov_ab, tiny: float,
           var_b: Optional[torch.Tensor] = None):
    """Clark (1961): mean and second moment of :math:`\\max(a, b)` for jointly Gaussian ``a``, ``b``
    with means ``ma``, ``mb``, second moments ``sa``, ``sb`` and covariance ``cov_ab`` (``var_b``:
    ``Var(b)`` when known). With :math:`\\theta^2 = \\mathrm{Var}(a - b)`,
    :math:`\\alpha = (\\mathbb E a - \\mathbb E b) / \\theta`, :math:`P = \\Phi(\\alpha)`:

    .. math:: \\mathbb E\\max = P\\,\\mathbb E a + (1 - P)\\,\\mathbb E b + \\theta\\phi(\\alpha), \\qquad
              \\mathbb E\\max^2 = P\\,\\mathbb E a^2 + (1 - P)\\,\\mathbb E b^2 + (\\mathbb E a + \\mathbb E b)\\theta\\phi(\\alpha),

    and the covariance of the maximum with any other jointly Gaussian variable mixes as
    :math:`P\\,\\mathrm{Cov}(a, \\cdot) + (1 - P)\\,\\mathrm{Cov}(b, \\cdot)` (exact). Returns the two
    moments and ``P``."""
    # Written op-lean and in place (for inference: not differentiable): a 10-class link runs this 9
    # times per call on small tensors, where each torch call costs more than its arithmetic.
    d = ma - mb
    th = torch.addcmul(sa, ma, ma, value=-1).add_((sb - mb * mb) if var_b is None else var_b)
    if cov_ab is not None:
        th.sub_(cov_ab, alpha=2)
    th = th.clamp_min_(tiny).sqrt_()
    al = d / th
    # P only mixes (absolute accuracy is all it needs): erf is cheaper than ndtr on CPU
    P = torch.erf(al * _SQRT_HALF).add_(1).mul_(0.5)
    thph = torch.addcmul(_constant(_LOG_INV_SQRT_2PI, al), al, al, value=-0.5).exp_().mul_(th)  # theta phi(alpha)
    m = torch.addcmul(mb, P, d).add_(thph)
    s = torch.addcmul(sb, P, sa - sb).addcmul_(ma + mb, thph)
    return m, s, P


def _win_probabilities(mean: torch.Tensor, cov: torch.Tensor, independent: Optional[torch.Tensor] = None):
    """:math:`P(u_k > \\max_{j \\ne k} u_j)` for Gaussian utilities ``u`` with mean ``(N, C)`` and
    covariance ``(N, C, C)`` or independent variances ``(N, C)``, normalised to sum to one. With
    ``independent`` (variances ``(N, C)``), also those of independent utilities with the same means,
    from the same pass: returns the pair.

    The leave-one-out maxima :math:`M_k` come from prefix and suffix maxima
    (:math:`M_k = \\max(\\max_{j<k} u_j, \\max_{j>k} u_j)`): two scans of ``C - 2`` of Clark's merges
    (:func:`_clark`), run side by side, and one batched merge, i.e. ``O(C^2)`` per example where
    merging each class's competitors one by one costs ``O(C^3)``. With a covariance, Clark's linear
    rule makes a running maximum :math:`\\sum_s w_s u_s` in covariance: a merge with mixing
    probability ``P`` updates the weights as :math:`w \\leftarrow P w + (1 - P) e_t` and the
    covariances with the utilities, :math:`K = w\\Sigma`, as :math:`K \\leftarrow P K + (1 - P)
    \\Sigma_{t\\cdot}`; the next merge needs its column ``t + 1``, :math:`\\mathrm{Cov}(M, u_{t+1})`,
    the middle merge the covariance of a prefix with a suffix maximum, :math:`K w'^\\top`.
    Independent utilities need neither: merged sets are disjoint, hence independent.
    """
    N, C = mean.shape
    if C == 1:
        return torch.ones_like(mean) if independent is None else (torch.ones_like(mean),) * 2
    tiny = torch.finfo(mean.dtype).tiny
    full = cov.dim() == 3
    var = torch.stack([cov.diagonal(dim1=-2, dim2=-1) if full else cov]
                      + ([] if independent is None else [independent]))                    # (B, N, C)
    B = var.shape[0]
    # Rows 2b and 2b + 1 of every state scan problem b's classes in order (prefix maxima) and in
    # reverse (suffix maxima); step t merges the t-th class of each row. Class-major (C, 2B, N), so
    # that each step reads a block; only problem 0 can have a covariance (carried for rows 0, 1).
    vT = var.transpose(0, 2)                                                          # (C, N, B)
    v = torch.stack([vT, vT.flip(0)], -1).flatten(-2).transpose(1, 2)                 # (C, 2B, N)
    mu = torch.stack([mean.T, mean.T.flip(0)], 1).repeat(1, B, 1)
    sec = torch.addcmul(v, mu, mu)
    mu, sec, v = mu.unbind(0), sec.unbind(0), v.unbind(0)      # per-step views, taken once
    m, s = mu[0], sec[0]
    ms, ss = [m], [s]
    if full:     # rows of Sigma and of I, in each direction's class order (columns too)
        sig = torch.stack([cov.transpose(0, 1), cov.flip(-2, -1).transpose(0, 1)], 1).unbind(0)  # C x (2, N, C)
        eye = torch.eye(C, dtype=mean.dtype, device=mean.device).unbind(0)
        K, w = sig[0], eye[0].expand(2, N, C)
        Ks, ws, cs = [K], [w], []
        pad = mean.new_zeros(2 * B - 2, N)
    for t in range(1, C - 1):
        c = None
        if full:
            cs.append(K[..., t])        # Cov(running max, u_t)
            c = cs[-1] if B == 1 else torch.cat([cs[-1], pad])
        m, s, P = _clark(m, s, mu[t], sec[t], c, tiny, v[t])
        ms.append(m)
        ss.append(s)
        if full:
            P = P[:2].unsqueeze(-1)
            K = torch.lerp(sig[t], K, P)
            if t < C - 2:               # the middle merge needs K and w of the first C - 2 maxima only
                w = torch.lerp(eye[t], w, P)
                Ks.append(K)
                ws.append(w)
    # M_0 = max(u_1..u_{C-1}) (last suffix), M_{C-1} = max(u_0..u_{C-2}) (last prefix), and for
    # 0 < k < C-1 the merge of max(u_0..u_{k-1}) (prefix k-1) with max(u_{k+1}..u_{C-1}) (suffix C-2-k)
    Mm, Ms = torch.stack(ms, 1).unflatten(0, (B, 2)), torch.stack(ss, 1).unflatten(0, (B, 2))   # (B, 2, C-1, N)
    m, s = [Mm[:, 1, -1:]], [Ms[:, 1, -1:]]
    if full:
        cs.append(K[..., C - 1])
        cs = torch.stack(cs, 1)      # (2, C-1, N): Cov(prefix up to k-1, u_k), Cov(suffix from k+1, u_k) reversed
        cross = [cs[1, -1:]]
    if C > 2:
        c = None
        if full:    # Cov(prefix, suffix) = K_prefix w_suffix^T, the suffix weights back in class order
            c = (torch.stack(Ks)[:, 0] * torch.stack(ws)[:, 1].flip(0, -1)).sum(-1)
            c = c if B == 1 else torch.cat([c.unsqueeze(0), c.new_zeros(B - 1, C - 2, N)])
        m_, s_, P = _clark(Mm[:, 0, :C - 2], Ms[:, 0, :C - 2], Mm[:, 1, :C - 2].flip(1), Ms[:, 1, :C - 2].flip(1),
                           c, tiny)
        m.append(m_)
        s.append(s_)
        if full:
            cross.append(torch.lerp(cs[1, :C - 2].flip(0), cs[0, :C - 2], P[0]))
    m.append(Mm[:, 0, -1:])
    s.append(Ms[:, 0, -1:])
    m, s = torch.cat(m, 1).transpose(1, 2), torch.cat(s, 1).transpose(1, 2)       # (B, N, C)
    spread = var + (s - m * m).clamp_min(0)
    if full:
        cross.append(cs[0, -1:])
        spread[0].sub_(torch.cat(cross).T, alpha=2)                                # - 2 Cov(M_k, u_k)
    p = torch.special.ndtr((mean - m) / spread.clamp_min(tiny).sqrt())
    p = p / p.sum(-1, keepdim=True)
    return p[0] if independent is None else (p[0], p[1])


def gumbel_max_softmax(mean: torch.Tensor, cov: torch.Tensor, order: str = "index",
                       exact_at_zero: bool = True) -> torch.Tensor:
    """Class probabilities :math:`\\mathbb E[\\mathrm{softmax}(f)]` for :math:`f \\sim \\mathcal N(\\mu, \\Sigma)`
    through the Gumbel-max identity and Clark's moments of a maximum.

    :math:`\\mathrm{softmax}_k(f) = P(k = \\arg\\max_j (f_j + g_j))` for independent standard Gumbel
    :math:`g` (exact), so :math:`\\mathbb E_f[\\mathrm{softmax}_k(f)]` is the probability that ``k`` wins
    for :math:`u = f + g`, whose mean is :math:`\\mu` (plus a constant) and covariance
    :math:`\\Sigma + \\tfrac{\\pi^2}{6} I`. Taking ``u`` Gaussian (a multinomial probit), with
    :math:`M_k = \\max_{j \\ne k} u_j` moment-matched to a Gaussian by Clark's merges (Clark, 1961:
    exact mean and variance of the maximum of two jointly Gaussian variables, and its covariance with
    the others, linear in theirs; the multinomial probit of Daganzo, Bouthelier and Sheffi, 1977;
    here through prefix and suffix maxima, :func:`_win_probabilities`),

    .. math:: p_k \\approx \\Phi\\Big(\\frac{\\mathbb E[u_k - M_k]}{\\sqrt{\\mathrm{Var}[u_k - M_k]}}\\Big),

    normalised to sum to one. Unlike the probit link it uses the covariance between the logits (the
    common part cancels in the differences) and keeps the tails, where the mean-field probit
    ``softmax(mu / sqrt(1 + pi/8 var))`` drifts far from the Gaussian integral (figures in
    ``docs/measured.md``).

    The Gaussian stand-in for the Gumbel noise is not exact even without posterior variance. With ``exact_at_zero`` the
    result is corrected by the same approximation's error at zero variance, weighted by the Gumbel
    noise's share of the total variance,
    :math:`p_k \\propto \\max\\big(0, \\hat p_k(\\mu, \\Sigma) + w\\,(\\mathrm{softmax}_k(\\mu) - \\hat p_k(\\mu, 0))\\big)`,
    :math:`w = \\tfrac{\\pi^2}{6} / (\\tfrac{\\pi^2}{6} + \\bar v)`, so that a point posterior gives the network's own
    softmax exactly and wide posteriors keep the uncorrected approximation (a heuristic; its error
    against a Monte Carlo integral is in ``docs/measured.md``). Both terms come from one pass of the merges; the
    zero-variance one needs no covariance bookkeeping.

    :param mean: ``(N, C)``; ``cov``: ``(N, C, C)`` or variances ``(N, C)``; ``order``: ``"index"``
        (prefixes and suffixes in class order) or ``"mean"`` (in decreasing order of the mean, per
        example); the two orders agree closely in NLL (``docs/measured.md``).
    """
    if order not in ("index", "mean"):
        raise ValueError(f"gumbel_max_softmax: order must be 'index' or 'mean', got {order!r}.")
    if mean.dim() != 2 or cov.shape not in (mean.shape, mean.shape + mean.shape[-1:]):
        raise ValueError(f"gumbel_max_softmax: mean must be (N, C) and cov (N, C) or (N, C, C), got "
                         f"{tuple(mean.shape)} and {tuple(cov.shape)}.")
    N, C = mean.shape
    if C == 1:
        return torch.ones_like(mean)
    full = cov.dim() == 3
    if order == "mean":        # work in decreasing order of the mean (per example), then undo it
        perm = torch.argsort(mean, -1, descending=True)
        mean = mean.gather(-1, perm)
        cov = (cov.gather(-2, perm.unsqueeze(-1).expand(-1, -1, C)).gather(-1, perm.unsqueeze(-2).expand(-1, C, -1))
               if full else cov.gather(-1, perm))
    noise = GUMBEL_VAR * torch.eye(C, dtype=mean.dtype, device=mean.device) if full else GUMBEL_VAR
    if not exact_at_zero:
        p = _win_probabilities(mean, cov + noise)
    else:
        # Additive, not multiplicative: the Gaussian tails underflow where the Gumbel ones do not,
        # so a ratio would blow up for unlikely classes; the difference stays bounded.
        # The zero-variance error belongs to the Gumbel part of the noise: it is weighted by that
        # part's share of the total, pi^2/6 / (pi^2/6 + v), v the example's mean logit variance.
        # (one pass serves both terms; the zero-variance one needs no covariance rows)
        p_cov, p_zero = _win_probabilities(mean, cov + noise, independent=torch.full_like(mean, GUMBEL_VAR))
        v = (cov.diagonal(dim1=-2, dim2=-1) if full else cov).mean(-1, keepdim=True)
        p = (p_cov + (softmax(mean) - p_zero) * (GUMBEL_VAR / (GUMBEL_VAR + v))).clamp_min(0)
        p = p / p.sum(-1, keepdim=True)
    return p if order != "mean" else torch.empty_like(p).scatter_(-1, perm, p)


#: Quasi-Monte Carlo points of :func:`sobol_softmax` by default.
SOBOL_POINTS = 256
_SOBOL = {}


def _sobol_normals(num_points: int, dim: int, dtype, device) -> torch.Tensor:
    """``(num_points, dim)`` standard normal quasi-random points: a scrambled Sobol sequence (fixed
    seed, so every call gives the same points) through the normal quantile function. Cached."""
    key = (num_points, dim, dtype, device)
    if key not in _SOBOL:
        engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=0)
        u = engine.draw(num_points, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
        _SOBOL[key] = torch.special.ndtri(u).to(dtype=dtype, device=device)
    return _SOBOL[key]


def _cov_factor(cov: torch.Tensor) -> torch.Tensor:
    """A factor ``L`` with ``L L^T = cov`` per example: Cholesky, or where a covariance is singular
    (zero variances: a point posterior) the symmetric square root from its eigenvalues, clamped at 0."""
    L, info = torch.linalg.cholesky_ex(cov)
    bad = info != 0
    if bad.any():
        w, V = torch.linalg.eigh(cov[bad])
        L = L.clone()
        L[bad] = V * w.clamp_min(0).sqrt().unsqueeze(-2)
    return L


def sobol_softmax(mean: torch.Tensor, cov: torch.Tensor, num_points: int = SOBOL_POINTS,
                  max_elements: int = 2 ** 22) -> torch.Tensor:
    """Class probabilities :math:`\\mathbb E[\\mathrm{softmax}(f)]` for :math:`f \\sim \\mathcal N(\\mu, \\Sigma)`
    by quasi-Monte Carlo over the logits alone,

    .. math:: p \\approx \\frac{1}{S} \\sum_{s=1}^S \\mathrm{softmax}(\\mu + L z_s), \\qquad L L^\\top = \\Sigma,

    with ``z_s`` the first ``S`` points of a scrambled Sobol sequence mapped to standard normals
    (Owen, 1998: the error of such rules falls nearly as ``1/S`` for smooth integrands, against
    ``1/sqrt(S)`` for random draws). The points are fixed, so the result is deterministic. The
    integral is over the ``C`` logits only, not the weights: ``S C^2`` multiply-adds per example.
    Unlike the closed-form links (:func:`probit`, :func:`gumbel_max_softmax`) it converges to the
    Gaussian integral itself.

    :param mean: ``(N, C)``; ``cov``: ``(N, C, C)`` or variances ``(N, C)``;
    :param num_points: ``S``; ``max_elements``: examples are taken in chunks whose ``(n, S, C)``
        logits hold at most this many numbers (bounds memory).
    """
    if mean.dim() != 2 or cov.shape not in (mean.shape, mean.shape + mean.shape[-1:]):
        raise ValueError(f"sobol_softmax: mean must be (N, C) and cov (N, C) or (N, C, C), got "
                         f"{tuple(mean.shape)} and {tuple(cov.shape)}.")
    if num_points < 1:
        raise ValueError(f"sobol_softmax: num_points must be at least 1, got {num_points}.")
    N, C = mean.shape
    z = _sobol_normals(num_points, C, mean.dtype, mean.device)
    full = cov.dim() == 3
    scale = _cov_factor(cov).transpose(-1, -2) if full else cov.clamp_min(0).sqrt()
    rows = max(1, max_elements // (num_points * C))
    out = []
    for start in range(0, N, rows):
        s = scale[start:start + rows]
        f = z @ s if full else z * s.unsqueeze(-2)              # (n, S, C)
        f += mean[start:start + rows].unsqueeze(-2)
        f -= f.amax(-1, keepdim=True)
        f.exp_()
        f /= f.sum(-1, keepdim=True)
        out.append(f.mean(-2))
    return torch.cat(out)
