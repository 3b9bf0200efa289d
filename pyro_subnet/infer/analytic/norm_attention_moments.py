"""Moments of ``LayerNorm`` (linearised at the mean, with the expected scale) and of the value
path of attention (queries and keys at the mean input), after Li, Klasson, Solin and Trapp,
*Streamlining Prediction in Bayesian Deep Learning* (ICLR 2025).
"""

from __future__ import annotations

from typing import Optional

import torch

from .gaussian_activation import Gaussian, _dense, _sq_norm


def layer_norm(x: Gaussian, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
               weight_var: Optional[torch.Tensor] = None, bias_var: Optional[torch.Tensor] = None) -> Gaussian:
    """``LayerNorm`` over the last dimension, linearised at the mean with the expected scale.

    A sample :math:`a` is normalised by its own spread over the ``F`` features, whose expectation is
    :math:`\\mathrm{Var}_d(\\mu) + \\tfrac1F \\sum_d \\mathrm{Var}(a_d)`, not by the spread of the mean
    alone: with a wide input the latter overstates the output variance. With :math:`\\hat x = (\\mu - \\bar\\mu)/s`,
    :math:`s = \\sqrt{\\mathrm{Var}_d(\\mu) + \\overline{\\mathrm{Var}(a)} + \\epsilon}`, the
    Jacobian is :math:`J = \\mathrm{diag}(\\gamma)\\, s^{-1} P`,
    :math:`P = I - \\tfrac1F 1 1^\\top - \\tfrac1F \\hat x \\hat x^\\top` (the exact derivative with the
    centring; the paper's code keeps only :math:`\\gamma^2 / s^2`). Gaussian ``gamma, beta`` with
    (marginal) variances ``weight_var``, ``bias_var``, taken independent, add
    :math:`\\mathrm{Var}(\\gamma)(\\hat x^2 + \\mathrm{Var}(\\hat x)) + \\mathrm{Var}(\\beta)` on the diagonal.

    The output mean is the second-order (delta-method) expectation of :math:`(a_d - \\bar a)/\\sigma(a)`
    for :math:`a \\sim \\mathcal N(\\mu, D)` (``D`` the total variances), with :math:`y = s^2`,
    :math:`c = \\mu - \\bar\\mu`: :math:`\\mathbb E[\\sigma^{-1}] \\approx y^{-1/2}(1 + \\tfrac38 \\mathrm{Var}(\\sigma^2) / y^2)`
    (the Jensen gap of :math:`y^{-1/2}`; :math:`\\mathrm{Var}(\\sigma^2) = \\tfrac{2}{F^2}\\mathrm{tr}(PDPD) +
    \\tfrac{4}{F^2} c^\\top D c` for the centring ``P``) and :math:`\\mathrm{Cov}(a_d - \\bar a, \\sigma^{-1}) \\approx
    -\\tfrac1F y^{-3/2} (P (D c))_d`. Without it the means shrink toward zero whenever the
    variances are comparable to the spread.
    """
    x = x.materialised()
    mean, var, A = x
    A = _dense(A)
    F = mean.shape[-1]
    # the expected spread of a sample over the features, not that of the mean (see the docstring)
    tv = x.total_var()
    centred = mean - mean.mean(-1, keepdim=True)
    # (Tensor.var over a short last dimension is ~50x slower on CPU than these sums)
    sq = centred * centred
    tv_sum = tv.sum(-1, keepdim=True)
    y = (sq.sum(-1, keepdim=True) + tv_sum) / F + eps
    s = y.sqrt()
    xhat = centred / s
    # second-order mean of the normalised value (see the docstring)
    trace = (tv * tv).sum(-1, keepdim=True) * (1 - 2 / F) + tv_sum * tv_sum / F ** 2
    dc = tv * centred
    var_y = (2 * trace + 4 * (dc * centred).sum(-1, keepdim=True)) / F ** 2
    xhat_mean = xhat * (1 + 0.375 * var_y / (y * y)) - (dc - dc.mean(-1, keepdim=True)) / (F * y * s)
    gamma = torch.ones_like(mean) if weight is None else weight.expand_as(mean)
    out_mean = gamma * xhat_mean + (0 if bias is None else bias)
    if x.full:
        # J var J^T with J = diag(gamma / s) P: the P var P^T below, scaled on both sides
        eye = torch.eye(F, dtype=mean.dtype, device=mean.device)
        P = eye - 1.0 / F - xhat.unsqueeze(-1) * xhat.unsqueeze(-2) / F
        pvp = P @ var @ P.transpose(-1, -2)
        g = gamma / s
        out_var = g.unsqueeze(-1) * pvp * g.unsqueeze(-2)
        xvar = pvp.diagonal(dim1=-2, dim2=-1) / y
    else:
        # diag(P diag(var) P^T) without forming P (F x F per token): with P_ij = d_ij - c_ij,
        # c_ij = (1 + xhat_i xhat_j) / F, sum_j P_ij^2 var_j = var_i (1 - 2 c_ii) + sum_j c_ij^2 var_j
        vx = var * xhat
        x2 = xhat * xhat
        s0, s1, s2 = var.sum(-1, keepdim=True), vx.sum(-1, keepdim=True), (vx * xhat).sum(-1, keepdim=True)
        pvar = var * (1 - 2 * (1 + x2) / F) + (s0 + xhat * (2 * s1) + x2 * s2) / F ** 2
        xvar = pvar.clamp_min_(0) / y
        out_var = gamma * gamma * xvar
    out_A = None
    if A is not None:
        # P A = A - mean_d(A) - xhat (xhat^T A) / F, one token at a time (O(F r), not O(F^2 r))
        xh = xhat.unsqueeze(-1)
        PA = A - A.mean(-2, keepdim=True) - xh * (xh * A).sum(-2, keepdim=True) / F
        out_A = (gamma / s).unsqueeze(-1) * PA
        xvar = xvar + _sq_norm(PA) / y
    extra = 0
    if weight_var is not None:
        extra = extra + weight_var * (xhat ** 2 + xvar)
    if bias_var is not None:
        extra = extra + bias_var
    if torch.is_tensor(extra):
        out_var = out_var + (torch.diag_embed(extra) if x.full else extra)
    return Gaussian(out_mean, out_var, out_A)


def attention_values(v: Gaussian, attn: torch.Tensor) -> Gaussian:
    """Attention output :math:`O_t = \\sum_s \\alpha_{ts} V_s` with a fixed attention matrix
    :math:`\\alpha` (from the mean queries and keys) and Gaussian values whose independent parts are
    independent across tokens: :math:`\\mathbb E[O] = \\alpha\\,\\mathbb E[V]`,
    :math:`A_O = \\alpha A_V`, :math:`\\mathrm{Var}[\\eta_O] = \\alpha^{\\circ 2}\\,\\mathrm{Var}[\\eta_V]`.

    :param v: values with mean/var ``(N, H, T, d)`` and ``A`` ``(N, H, T, d, r)``; ``attn``: ``(N, H, T, T)``.
    """
    v = v.materialised()
    A = None if v.A is None else torch.einsum("nhts,nhsdr->nhtdr", attn, _dense(v.A))
    return Gaussian(attn @ v.mean, (attn ** 2) @ v.var, A)
