"""Moment propagation through single layers: pure functions ``(mean, var | cov) -> (mean, var | cov)``.

The streamlined predictive of Li, Klasson, Solin and Trapp, *Streamlining Prediction in Bayesian
Deep Learning* (ICLR 2025), replaces the average over weight samples by one pass that carries the
mean and the (co)variance of every activation:

* **linear layers** (weights Gaussian under the posterior, independent of the layer's input):
  Gaussian moment matching, exact for the first two moments;
* **elementwise activations**: local linearisation at the mean,
  :math:`g(h) \\approx g(\\mu) + g'(\\mu)(h - \\mu)`;
* **normalisation**: linearisation of ``LayerNorm`` at the mean;
* **attention**: queries and keys from the mean input, the value path Gaussian.

An activation is either *diagonal* (``var`` of shape ``(..., F)``: features independent, the
paper's mean-field activations) or *full* (``cov`` of shape ``(..., F, F)`` per example: the
covariance between features of one example). Examples are always independent.

Linear layer, augmented with a constant input: :math:`h = \\tilde W \\tilde a`,
:math:`\\tilde W = [W, b]`, :math:`\\tilde a = [a; 1]`, with
:math:`\\tilde a \\sim (\\mu, \\Sigma)` and :math:`\\tilde W` independent of it,

.. math::

    \\mathbb E[h] = M \\mu, \\qquad
    \\mathrm{Cov}(h_k, h_l) = (M \\Sigma M^\\top)_{kl}
        + \\sum_{i,j} \\mathrm{Cov}(\\tilde W_{ki}, \\tilde W_{lj})\\,(\\Sigma_{ij} + \\mu_i \\mu_j).

The weight covariance of one layer is ``diag(V) + G G^T`` with ``V`` of shape ``(out, in+1)``
(independent part) and ``G`` of shape ``(out, in+1, r)`` (a factor of the correlated part,
e.g. a subnetwork's or a full-rank covariance). With ``G``, the last term is
:math:`\\sum_r (G_r\\mu)(G_r\\mu)^\\top + \\sum_r G_r \\Sigma G_r^\\top`; the first sum is exact; the
second is computed with the diagonal of :math:`\\Sigma` only (the only approximation in this
function; it is a product of two variances, and zero at the first layer, whose input is data).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

Moments = Tuple[torch.Tensor, torch.Tensor]


def is_full(mean: torch.Tensor, var: torch.Tensor) -> bool:
    """Whether ``var`` is a per-example covariance ``(..., F, F)`` rather than variances ``(..., F)``."""
    return var.dim() == mean.dim() + 1


def diagonal(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """The variances ``(..., F)`` of either representation."""
    return var.diagonal(dim1=-2, dim2=-1) if is_full(mean, var) else var


def _augment(mean: torch.Tensor, var: torch.Tensor, full: bool):
    one = torch.ones_like(mean[..., :1])
    mean1 = torch.cat([mean, one], -1)
    var1 = torch.cat([diagonal(mean, var), torch.zeros_like(one)], -1)
    return mean1, var1


def linear(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           weight_var: Optional[torch.Tensor] = None, factor: Optional[torch.Tensor] = None,
           full_output: Optional[bool] = None) -> Moments:
    """Moments of ``h = W a + b`` for Gaussian ``W, b`` independent of ``a`` (see the module docstring).

    :param mean: input mean ``(..., in)``.
    :param var: input variances ``(..., in)`` or covariance ``(..., in, in)``.
    :param weight: weight mean ``(out, in)``; ``bias``: bias mean ``(out,)`` or ``None``.
    :param weight_var: independent weight variances ``(out, in + 1)`` (last column: the bias), or
        ``None`` (no independent part).
    :param factor: factor ``G`` of the correlated weight covariance ``(out, in + 1, r)`` or ``None``.
    :param full_output: return a covariance ``(..., out, out)`` (default: the input's representation).
    :returns: ``(mean (..., out), var (..., out) or cov (..., out, out))``.
    """
    full_in = is_full(mean, var)
    full_out = full_in if full_output is None else full_output
    out_mean = mean @ weight.T
    if bias is not None:
        out_mean = out_mean + bias
    # Input uncertainty through the mean weights: M Sigma M^T.
    if full_in:
        mvar = weight @ var @ weight.T
        out_var = mvar if full_out else mvar.diagonal(dim1=-2, dim2=-1)
    else:
        out_var = (var.unsqueeze(-2) * weight) @ weight.T if full_out else var @ (weight ** 2).T
    if weight_var is None and factor is None:
        return out_mean, out_var
    mean1, var1 = _augment(mean, var, full_in)
    extra = 0
    if weight_var is not None:
        # Independent weights: sum_i V_ki (mu_i^2 + Sigma_ii); no cross terms between outputs.
        d = (mean1 ** 2 + var1) @ weight_var.T
        extra = torch.diag_embed(d) if full_out else d
    if factor is not None:
        z = torch.einsum("kir,...i->...kr", factor, mean1)          # G_r mu, all r at once
        if full_out:
            extra = extra + z @ z.transpose(-1, -2)
            cross = torch.einsum("kir,lir->ikl", factor, factor)     # Cov(W_ki, W_li)
            extra = extra + torch.einsum("...i,ikl->...kl", var1, cross)
        else:
            extra = extra + (z ** 2).sum(-1) + var1 @ (factor ** 2).sum(-1).T
    return out_mean, out_var + extra


def elementwise(fn: Callable[[torch.Tensor], torch.Tensor], mean: torch.Tensor, var: torch.Tensor) -> Moments:
    """Local linearisation of an elementwise function at the mean: :math:`\\mu' = g(\\mu)`,
    :math:`\\Sigma' = J \\Sigma J` with :math:`J = \\mathrm{diag}(g'(\\mu))` (``g'`` by forward-mode
    autodiff, so any elementwise function works: ReLU, GELU, SiLU, tanh, sigmoid, ...)."""
    out, slope = torch.func.jvp(fn, (mean,), (torch.ones_like(mean),))
    if is_full(mean, var):
        return out, slope.unsqueeze(-1) * var * slope.unsqueeze(-2)
    return out, slope ** 2 * var


def layer_norm(mean: torch.Tensor, var: torch.Tensor, normalized_dim: int, weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], eps: float, weight_var: Optional[torch.Tensor] = None,
               bias_var: Optional[torch.Tensor] = None) -> Moments:
    """``LayerNorm`` over the last dimension, linearised at the mean.

    With :math:`\\hat x = (\\mu - \\bar\\mu)/s`, :math:`s = \\sqrt{\\mathrm{Var}_d(\\mu) + \\epsilon}`, the
    Jacobian is :math:`J = \\mathrm{diag}(\\gamma)\\, s^{-1} (I - \\tfrac1F 1 1^\\top - \\tfrac1F \\hat x \\hat x^\\top)`
    (exact derivative, including the centring; the paper's code keeps only
    :math:`\\gamma^2 / s^2`). Independent Gaussian ``gamma, beta`` (variances ``weight_var``,
    ``bias_var``) add :math:`\\mathrm{Var}(\\gamma)(\\hat x^2 + \\mathrm{Var}(\\hat x)) + \\mathrm{Var}(\\beta)`
    on the diagonal.
    """
    F = mean.shape[-1]
    if normalized_dim != 1:
        raise ValueError("AnalyticPredictive: LayerNorm over more than the last dimension is not supported.")
    mu = mean.mean(-1, keepdim=True)
    s = (mean.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    xhat = (mean - mu) / s
    gamma = torch.ones_like(mean) if weight is None else weight.expand_as(mean)
    eye = torch.eye(F, dtype=mean.dtype, device=mean.device)
    # J (..., F, F) = diag(gamma / s) (I - 11^T/F - xhat xhat^T / F)
    P = eye - 1.0 / F - xhat.unsqueeze(-1) * xhat.unsqueeze(-2) / F
    J = (gamma / s).unsqueeze(-1) * P
    out_mean = gamma * xhat + (0 if bias is None else bias)
    if is_full(mean, var):
        out_var = J @ var @ J.transpose(-1, -2)
        xvar = ((P @ var @ P.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1)) / s ** 2
    else:
        out_var = (J ** 2) @ var.unsqueeze(-1)
        out_var = out_var.squeeze(-1)
        xvar = ((P ** 2) @ var.unsqueeze(-1)).squeeze(-1) / s ** 2
    add = 0
    if weight_var is not None:
        add = add + weight_var * (xhat ** 2 + xvar)
    if bias_var is not None:
        add = add + bias_var
    if torch.is_tensor(add):
        out_var = out_var + (torch.diag_embed(add) if is_full(mean, var) else add)
    return out_mean, out_var


def conv2d(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           weight_var: Optional[torch.Tensor], bias_var: Optional[torch.Tensor],
           factor_w: Optional[torch.Tensor], factor_b: Optional[torch.Tensor], **conv) -> Moments:
    """``Conv2d`` with Gaussian weights, diagonal activations ``(N, C, H, W)``.

    Per output pixel this is the linear layer over its receptive field:
    :math:`\\mathrm{Var}[h] = (\\mu^2 + v) * V_W + v * M^2 + V_b + \\sum_r (\\mu * G_r + g_r)^2`
    (``*`` the convolution), exact for each output's variance; covariances between output pixels
    and channels are dropped (diagonal activations).

    :param factor_w: ``(r, C_out, C_in, kh, kw)`` and ``factor_b`` ``(r, C_out)``: the correlated part.
    """
    f = torch.nn.functional.conv2d
    out_mean = f(mean, weight, bias, **conv)
    out_var = f(var, weight ** 2, None, **conv)
    if weight_var is not None:
        out_var = out_var + f(mean ** 2 + var, weight_var, None, **conv)
    if bias_var is not None:
        out_var = out_var + bias_var[:, None, None]
    if factor_w is not None:
        r, co = factor_w.shape[:2]
        z = f(mean, factor_w.reshape(r * co, *factor_w.shape[2:]), factor_b.reshape(-1), **conv)
        z = z.reshape(z.shape[0], r, co, *z.shape[2:])
        out_var = out_var + (z ** 2).sum(1) + f(var, (factor_w ** 2).sum(0), None, **conv)
    return out_mean, out_var


def attention_values(mean_v: torch.Tensor, var_v: torch.Tensor, attn: torch.Tensor) -> Moments:
    """Attention output :math:`O_t = \\sum_s A_{ts} V_s` with a fixed attention matrix ``A``
    (from the mean queries and keys) and Gaussian values, tokens independent:
    :math:`\\mathbb E[O] = A\\,\\mathbb E[V]`, :math:`\\mathrm{Var}[O] = A^{\\circ 2}\\,\\mathrm{Var}[V]`.

    :param mean_v, var_v: ``(N, H, T, d)``; ``attn``: ``(N, H, T, T)``.
    """
    return attn @ mean_v, (attn ** 2) @ var_v


def probit_softmax(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Class probabilities by the probit approximation,
    :math:`\\mathrm{softmax}(\\mu / \\sqrt{1 + \\tfrac{\\pi}{8} v})` (MacKay, 1992; uses the
    variances of the logits)."""
    return torch.softmax(mean / torch.sqrt(1 + torch.pi / 8 * var), dim=-1)
