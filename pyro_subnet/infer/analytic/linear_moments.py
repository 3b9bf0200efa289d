"""Moments of linear maps with Gaussian weights (``nn.Linear``, ``nn.Conv2d``) of a
:class:`~.gaussian_activation.Gaussian` input: Gaussian moment matching (Li, Klasson, Solin and
Trapp, *Streamlining Prediction in Bayesian Deep Learning*, ICLR 2025), with the correlated
weights' factor carried through ``A``.

Linear layer, augmented with a constant input, :math:`h = \\tilde W \\tilde a`,
:math:`\\tilde W = [W, b] = M + \\Delta + G \\varepsilon` (``G`` of shape ``(out, in+1, r)``,
:math:`\\Delta` independent with variances ``V``):

.. math::

    \\mathbb E[h] &= M\\mu + \\textstyle\\sum_r G_r A_r, \\qquad A_h = M A + G\\mu, \\\\
    \\Sigma_h &= M \\Sigma M^\\top + \\mathrm{diag}\\big(V (\\mu^2 + \\mathrm{diag}(\\Sigma + A A^\\top))\\big)
        + \\textstyle\\sum_i \\Sigma_{ii}\\, \\mathrm{Cov}_G(\\tilde W_{\\cdot i}).

where correlated weights meet a correlated input, the products
:math:`q_k = \\sum_i (G_{ki}\\varepsilon)(A_i\\varepsilon) = \\varepsilon^\\top B_k \\varepsilon`,
:math:`B_k = \\sum_i G_{ki}^\\top A_i`, add (uncorrelated with everything linear in
:math:`\\varepsilon`, since odd moments vanish)

.. math:: \\mathrm{Cov}(q_k, q_l) = \\mathrm{tr}(B_k B_l^\\top) + \\mathrm{tr}(B_k B_l)
          = \\textstyle\\sum_{ij} (G_{ki} \\cdot G_{lj})(A_i \\cdot A_j) + (G_{ki} \\cdot A_j)(G_{lj} \\cdot A_i)

(:class:`ProductTerms`; what they add on a digits MLP is in ``docs/measured.md``). Exact for a Gaussian input with
``A = 0`` (e.g. data); what is dropped otherwise: the off-diagonal of :math:`\\Sigma` in the last
term (a product of two posterior variances), and the product terms where computing them would cost
more than 8 times the layer's first-order terms (dense factors: a full or low-rank covariance over
every weight), unless asked for.

In place where that saves time: for inference, not for autograd.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from .gaussian_activation import Gaussian, ScaledFactor, _dense, _diag, _left_matmul, _per_column, _sq_norm


class ProductTerms(NamedTuple):
    """What the covariance of the products :math:`(G\\varepsilon)(A\\varepsilon)` needs of a linear layer
    (see the module docstring), over its ``P`` correlated weights :math:`W_{k_p i_p}` (bias excluded:
    its input is the constant 1): ``rows``: the position of :math:`i_p` among the layer's inputs with
    correlated weights (``LinearWeights.factor_inputs``), ``(P,)``; ``factor_t``: :math:`G_{k_p i_p}`
    as columns, ``(r, P)``; ``outputs``: :math:`k_p`, ``(P,)``."""

    rows: torch.Tensor
    factor_t: torch.Tensor
    outputs: torch.Tensor


class LinearWeights(NamedTuple):
    """A linear layer's posterior and what :func:`linear` derives from it alone (computed once per
    posterior by :func:`prepare_linear`, not once per batch).

    ``weight`` ``(out, in)``, ``bias`` ``(out,)`` or ``None``; ``weight_var_t``: the independent
    variances of ``[W, b]`` transposed, ``(in + 1, out)``; ``factor``: ``G`` ``(out, in + 1, r)``;
    ``factor_flat``: ``G`` as ``(in + 1, out * r)`` (``None`` where the sparse form below is kept);
    ``weight_sq_t``: ``(W^2)^T``; ``factor_sq_t``: :math:`(\\sum_r G_{kir}^2)^T`, ``(in, out)``;
    ``outer``: :math:`W_{ki} W_{li}` as ``(in, out * out)`` and ``cross``:
    :math:`\\mathrm{Cov}_G(W_{ki}, W_{li})` as ``(in, out * out)`` (full covariances only); the terms
    that only an uncertain input reads are ``None`` where :func:`prepare_linear` was told the input
    is known;
    ``sparse_idx`` ``(out, m)`` and ``sparse_factor`` ``(out, m, r)``: when few entries of ``[W, b]``
    are correlated (a subnetwork), the ``m`` correlated inputs of each output unit (padded with
    zero rows), so that :math:`G\\tilde\\mu` costs ``N out m r`` instead of ``N out (in + 1) r``;
    ``factor_inputs``: the inputs with any correlated weight (``None``: all of them) and
    ``factor_on_inputs``: ``G`` on those inputs as ``(inputs * r, out)``, for the mean term
    :math:`\\sum_{ir} G_{kir} A_{ir}`; ``products``: :class:`ProductTerms`, or ``None`` where they
    are not computed.
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    weight_var_t: Optional[torch.Tensor]
    factor: Optional[torch.Tensor]
    factor_flat: Optional[torch.Tensor]
    weight_sq_t: torch.Tensor
    factor_sq_t: Optional[torch.Tensor]
    outer: Optional[torch.Tensor]
    cross: Optional[torch.Tensor]
    sparse_idx: Optional[torch.Tensor] = None
    sparse_factor: Optional[torch.Tensor] = None
    factor_inputs: Optional[torch.Tensor] = None
    factor_on_inputs: Optional[torch.Tensor] = None
    products: Optional[ProductTerms] = None


def prepare_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], weight_var: Optional[torch.Tensor] = None,
                   factor: Optional[torch.Tensor] = None, full: bool = False,
                   products: Union[bool, str] = "auto", correlated: Optional[torch.Tensor] = None,
                   exact_input: bool = False) -> LinearWeights:
    """:class:`LinearWeights` from the weight mean ``(out, in)``, bias mean, independent variances of
    ``[W, b]`` ``(out, in + 1)`` and factor ``G`` ``(out, in + 1, r)`` (see :func:`linear`).
    ``correlated``: which entries of ``G`` are not zero, ``(out, in + 1)``, where the caller knows
    (default: read off ``G``).
    ``products``: whether to prepare the covariance of the products :math:`(G\\varepsilon)(A\\varepsilon)`
    (:class:`ProductTerms`): ``True``, ``False``, or ``"auto"``: where it is cheap next to the
    layer's first-order terms (a subnetwork, not a dense factor; see :func:`_product_terms`).
    ``exact_input``: for a known input only (the data, :attr:`Gaussian.exact`): what :func:`linear`
    reads of an input's variances and factor (``weight_sq_t``, ``outer``, ``cross``,
    ``factor_sq_t``, ``factor_on_inputs``, ``products``) is left ``None``; the factor's
    ``factor_flat`` or sparse form is all it needs."""
    out, n_in = weight.shape
    outer = cross = factor_flat = factor_sq_t = weight_sq_t = None
    sparse_idx = sparse_factor = factor_inputs = factor_on_inputs = product_terms = None
    if not exact_input:
        weight_sq_t = (weight ** 2).T.contiguous()
        if full:
            outer = (weight.T.unsqueeze(-1) * weight.T.unsqueeze(-2)).reshape(n_in, out * out)
    if factor is not None:
        nz = (factor != 0).any(-1) if correlated is None else correlated   # (out, in + 1): correlated entries
        if not exact_input:
            factor_sq_t = (factor[:, :-1] ** 2).sum(-1).T
            if full:
                cross = torch.einsum("kir,lir->ikl", factor[:, :-1], factor[:, :-1]).reshape(n_in, out * out)
            used = nz[:, :-1].any(0).nonzero().squeeze(-1)          # inputs with correlated weights
            factor_inputs = None if used.numel() == n_in else used
            on_inputs = factor[:, :-1] if factor_inputs is None else factor[:, used]
            factor_on_inputs = on_inputs.reshape(out, -1).T.contiguous()
            product_terms = _product_terms(factor, nz[:, :-1], used, products)
        counts = nz.sum(-1)
        m = int(counts.max())
        if 2 * m <= n_in + 1:                                       # worth it: at least half the work saved
            # stable sort puts each unit's correlated inputs first, in input order
            order = torch.sort(nz.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :max(m, 1)]
            keep = torch.arange(max(m, 1), device=factor.device) < counts.unsqueeze(-1)
            sparse_idx = order
            sparse_factor = factor.gather(1, order.unsqueeze(-1).expand(-1, -1, factor.shape[-1])) * keep.unsqueeze(-1)
        else:
            factor_flat = factor.permute(1, 0, 2).reshape(n_in + 1, -1)
    return LinearWeights(weight, bias, None if weight_var is None else weight_var.T.contiguous(), factor,
                         factor_flat, weight_sq_t, factor_sq_t, outer, cross, sparse_idx, sparse_factor,
                         factor_inputs, factor_on_inputs, product_terms)


def _product_terms(factor: torch.Tensor, correlated: torch.Tensor, used: torch.Tensor,
                   products: Union[bool, str]) -> Optional[ProductTerms]:
    """:class:`ProductTerms` of a layer with factor ``G`` ``(out, in + 1, r)``, whose correlated weights
    are ``correlated`` ``(out, in)`` and correlated inputs ``used``, or ``None``: none wanted, none
    correlated, or under ``"auto"`` more than 8 times
    the first-order terms' work (per example ``r u (u + P) + P^2`` against ``r out (in + u)``) or
    memory (``P^2 + u P + u^2`` against ``r (in + out)``)."""
    if products not in (True, False, "auto"):
        raise ValueError(f"products must be True, False or 'auto', got {products!r}.")
    out, n_in, r = factor.shape[0], factor.shape[1] - 1, factor.shape[-1]
    k, i = correlated.nonzero(as_tuple=True)
    P, u = k.numel(), used.numel()
    if not products or P == 0:
        return None
    if products == "auto" and (r * u * (u + P) + P * P > 8 * r * out * (n_in + u)
                               or P * P + u * P + u * u > 8 * r * (n_in + out)):
        return None
    position = torch.full((n_in,), -1, dtype=torch.long, device=factor.device)
    position[used] = torch.arange(u, device=factor.device)
    return ProductTerms(position[i], factor[k, i].T.contiguous(), k)


def _product_covariance(A_used: torch.Tensor, pt: ProductTerms, out: int, full: bool) -> torch.Tensor:
    """Covariance ``(..., out, out)`` (``full``) or variances ``(..., out)`` of the products
    :math:`q_k = \\sum_i (G_{ki}\\varepsilon)(A_i\\varepsilon)`, from the inputs' ``A`` on the
    correlated inputs, ``(..., u, r)``: :math:`\\mathrm{Cov}(q_k, q_l) = \\sum_{p \\in k, q \\in l}
    (G_p \\cdot G_q)(A_{i_p} \\cdot A_{i_q}) + (G_p \\cdot A_{i_q})(G_q \\cdot A_{i_p})`. Memory:
    ``P^2`` per example."""
    gram = pt.factor_t.T @ pt.factor_t                                          # G_p . G_q
    S = A_used @ A_used.transpose(-1, -2)                                       # A_i . A_j, (..., u, u)
    M = (A_used @ pt.factor_t)[..., pt.rows, :]                                 # [q, p] = A_{i_q} . G_p
    X = S[..., pt.rows, :][..., pt.rows] * gram + M * M.transpose(-1, -2)      # (..., P, P)
    k, batch = pt.outputs, X.shape[:-2]
    if full:
        by_row = X.new_zeros(*batch, out, X.shape[-1]).index_add_(-2, k, X)
        return X.new_zeros(*batch, out, out).index_add_(-1, k, by_row)
    same = (X * (k.unsqueeze(-1) == k)).sum(-1)                                # pairs with k_p = k_q
    return X.new_zeros(*batch, out).index_add_(-1, k, same)


def linear(x: Gaussian, lw: LinearWeights, full: bool = False, products: bool = True,
           lift: bool = False) -> Gaussian:
    """Moments of ``h = W a + b`` (see the module docstring).

    :param x: input ``Gaussian`` with features ``in`` last.
    :param lw: the layer's :class:`LinearWeights` (from :func:`prepare_linear`).
    :param full: return a full covariance ``(..., out, out)`` even for diagonal input (the mixing
        ``W diag(v) W^T`` correlates the outputs); a full input always gives a full output.
    :param lift: with a diagonal input and weights without a factor, carry the covariance that the
        input's independent variances induce between the outputs, :math:`W \\mathrm{diag}(v) W^\\top`,
        as new columns of ``A``: :math:`A_h = [W A,\\; W \\mathrm{diag}(\\sqrt v)]`, each new column a
        standard normal of this example (examples are independent, so per-example columns are as
        good as shared ones). The total covariance is that of ``full``, at the cost of a product
        with ``A`` (``out x in x r`` per example) instead of forming ``W \\Sigma W^T``
        (``out x in x in``); the output's ``var`` stays diagonal (the weights' own noise). Only for
        posteriors without a weight factor: the new columns are not the weights' ``epsilon``.
    :param products: keep the products of weight noise and input noise: for correlated weights
        :math:`(G\\varepsilon)(A\\varepsilon)`, their mean, and their covariance where ``lw.products`` is
        prepared; for independent weights :math:`\\Delta\\,(a - \\mu)`, its variance
        :math:`V \\mathrm{diag}(\\Sigma + A A^\\top)`. ``False``: none of them, so the output is
        linear in the weights' noise (with linearised activations, the network linearised in the
        weights: the GLM predictive).

    A known input (:attr:`Gaussian.exact`, e.g. the data) gives, whatever ``full``, an exactly
    diagonal independent part (each output unit has its own independent weights), so it stays
    diagonal and the products with the zero input variance are skipped.
    """
    exact_input = x.exact
    if x.var is None and not exact_input:
        x = x.materialised()
    mean, var, A = x
    weight, factor = lw.weight, lw.factor
    out_f = weight.shape[0]
    out_mean = mean @ weight.T
    if lw.bias is not None:
        out_mean = out_mean + lw.bias
    lift = lift and not exact_input and not x.full
    if lift and factor is not None:
        raise ValueError("moments.linear: lift needs weights without a factor (its columns would mix with "
                         "the weights' epsilon).")
    full_out = x.full or (full and not exact_input and not lift)
    out_A = None if A is None else _left_matmul(weight, A)
    if exact_input:
        out_var = None
    elif lift:
        out_var = torch.zeros_like(out_mean)
        lifted = ScaledFactor(torch.ones_like(out_mean), weight, var.sqrt(), lw.weight_sq_t)
        out_A = lifted if out_A is None else torch.cat([out_A, lifted.dense()], -1)
    elif x.full:
        out_var = weight @ var @ weight.T
    elif full_out:
        out_var = (var @ lw.outer).unflatten(-1, (out_f, out_f))
    else:
        out_var = var @ lw.weight_sq_t
    if lw.weight_var_t is None and factor is None:
        return Gaussian(out_mean, out_var, out_A)   # out_var None: still known (a deterministic layer)
    if lw.weight_var_t is not None:
        wv, wvb = lw.weight_var_t[:-1], lw.weight_var_t[-1]
        second = mean ** 2
        if not exact_input and products:     # the products of weight noise and input noise
            second = second + _diag(x)
            if A is not None:
                second = second + _sq_norm(A)
        d = second @ wv + wvb
        out_var = d if out_var is None else out_var + (torch.diag_embed(d) if full_out else d)
    if factor is not None:
        if lw.sparse_idx is not None:
            mean1 = torch.cat([mean, torch.ones_like(mean[..., :1])], -1)
            sel = mean1.reshape(-1, mean1.shape[-1])[:, lw.sparse_idx]              # (N, out, m)
            gm = torch.bmm(sel.transpose(0, 1), lw.sparse_factor).transpose(0, 1)   # (N, out, r)
            gm = gm.reshape(*mean.shape[:-1], out_f, gm.shape[-1])
        else:
            flat = lw.factor_flat
            if flat is None:        # (prepared for the sparse path only)
                flat = factor.permute(1, 0, 2).reshape(factor.shape[1], -1)
            gm = (mean @ flat[:-1] + flat[-1]).unflatten(-1, (out_f, -1))
        out_A = gm if out_A is None else out_A + gm
        if A is not None and products:
            # E[(G eps)(A eps)] = sum_ir G_kir A_ir, over the inputs that have correlated weights
            used = A if lw.factor_inputs is None else A[..., lw.factor_inputs, :]
            out_mean = out_mean + used.flatten(-2) @ lw.factor_on_inputs
            if lw.products is not None:
                out_var = out_var + _product_covariance(used, lw.products, out_f, full_out)
        if not exact_input:
            var_in = _diag(x)
            if full_out:
                out_var = out_var + (var_in @ lw.cross).unflatten(-1, (out_f, out_f))
            else:
                out_var = out_var + var_in @ lw.factor_sq_t
    return Gaussian(out_mean, out_var, out_A)


def conv2d(x: Gaussian, weight: torch.Tensor, bias: Optional[torch.Tensor], weight_var: Optional[torch.Tensor],
           bias_var: Optional[torch.Tensor], factor_w: Optional[torch.Tensor], factor_b: Optional[torch.Tensor],
           products: bool = True, **conv) -> Gaussian:
    """``Conv2d`` with Gaussian weights on diagonal activations ``(N, C, H, W)`` (``A``: ``(N, C, H, W, r)``).

    Per output pixel this is the linear layer over its receptive field (``*`` the convolution):
    :math:`\\mu' = \\mu * M + b`, :math:`A' = A * M + \\mu * G + g`,
    :math:`v' = v * M^2 + (\\mu^2 + v + \\textstyle\\sum_r A_r^2) * V + V_b + v * \\textstyle\\sum_r G_r^2`;
    covariances between output pixels and channels of the independent part are dropped, and of the
    products :math:`(G\\varepsilon)(A\\varepsilon)` only the mean is kept (none with ``products=False``).

    :param factor_w: ``G`` as ``(r, C_out, C_in, kh, kw)``; ``factor_b``: ``(r, C_out)``.
    """
    f = torch.nn.functional.conv2d
    mean, var, A = x.materialised()
    A = _dense(A)
    out_mean = f(mean, weight, bias, **conv)
    out_var = f(var, weight ** 2, None, **conv)
    out_A = None if A is None else _per_column(lambda c: f(c, weight, None, **conv), A)
    if weight_var is not None:
        second = mean ** 2 + var + (0 if A is None else _sq_norm(A))
        out_var = out_var + f(second, weight_var, None, **conv)
    if bias_var is not None:
        out_var = out_var + bias_var[:, None, None]
    if factor_w is not None:
        r, co = factor_w.shape[:2]
        z = f(mean, factor_w.reshape(r * co, *factor_w.shape[2:]), factor_b.reshape(-1), **conv)
        z = z.reshape(z.shape[0], r, co, *z.shape[2:]).movedim(1, -1)
        out_A = z if out_A is None else out_A + z
        if A is not None and products:
            # E[(G eps) * (A eps)] = sum_r A_r * G_r
            cols = A.movedim(-1, 1).reshape(A.shape[0], -1, *A.shape[2:4])      # (N, r*C_in, H, W)
            g = factor_w.transpose(0, 1).reshape(co, -1, *factor_w.shape[3:])   # (C_out, r*C_in, kh, kw)
            if conv.get("groups", 1) != 1:
                raise NotImplementedError("AnalyticPredictive: grouped Conv2d with correlated weights is not supported.")
            out_mean = out_mean + f(cols, g, None, **conv)
        out_var = out_var + f(var, (factor_w ** 2).sum(0), None, **conv)
    return Gaussian(out_mean, out_var, out_A)
