"""Moment propagation through single layers: pure functions of a :class:`Gaussian` activation.

The streamlined predictive of Li, Klasson, Solin and Trapp, *Streamlining Prediction in Bayesian
Deep Learning* (ICLR 2025), replaces the average over weight samples by one pass that carries the
mean and the (co)variance of every activation:

* **linear layers** (weights Gaussian under the posterior): Gaussian moment matching;
* **elementwise activations**: local linearisation at the mean,
  :math:`g(h) \\approx g(\\mu) + g'(\\mu)(h - \\mu)`;
* **normalisation**: linearisation of ``LayerNorm`` at the mean;
* **attention**: queries and keys from the mean input, the value path Gaussian.

Correlated weights. The weight posterior is
:math:`\\theta = m + \\delta + E F \\varepsilon` with independent :math:`\\delta \\sim \\mathcal N(0,
\\mathrm{diag}(v))` and one shared :math:`\\varepsilon \\sim \\mathcal N(0, I_r)` (the factor ``F`` of a
full-rank, low-rank or subnetwork covariance). Each activation is carried as

.. math:: a = \\mu + A \\varepsilon + \\eta, \\qquad \\eta \\sim (0, \\Sigma) \\text{ independent of } \\varepsilon,

so a :class:`Gaussian` is ``(mean, var, A)``: ``var`` of shape ``(..., F)`` (diagonal: features
independent, the paper's mean-field activations) or ``(..., F, F)`` (full: covariance between
features of one example), and ``A`` of shape ``(..., F, r)`` (or ``None``). The total covariance
is :math:`\\Sigma + A A^\\top`. ``A`` carries the correlations through the network, across layers
and between a layer's input and its weights, to first order in :math:`\\varepsilon` (the same
linearisation as the activations); examples are always independent.

Linear layer, augmented with a constant input, :math:`h = \\tilde W \\tilde a`,
:math:`\\tilde W = [W, b] = M + \\Delta + G \\varepsilon` (``G`` of shape ``(out, in+1, r)``,
:math:`\\Delta` independent with variances ``V``):

.. math::

    \\mathbb E[h] &= M\\mu + \\textstyle\\sum_r G_r A_r, \\qquad A_h = M A + G\\mu, \\\\
    \\Sigma_h &= M \\Sigma M^\\top + \\mathrm{diag}\\big(V (\\mu^2 + \\mathrm{diag}(\\Sigma + A A^\\top))\\big)
        + \\textstyle\\sum_i \\Sigma_{ii}\\, \\mathrm{Cov}_G(\\tilde W_{\\cdot i}).

Exact for a Gaussian input with ``A = 0`` (e.g. data); what is dropped otherwise: the variance of
the products :math:`(G\\varepsilon)(A\\varepsilon)` and the off-diagonal of :math:`\\Sigma` in the last term
(both products of two posterior variances).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch


class Gaussian(NamedTuple):
    """An activation :math:`\\mu + A\\varepsilon + \\eta` (see the module docstring)."""

    mean: torch.Tensor
    var: torch.Tensor
    A: Optional[torch.Tensor] = None

    @property
    def full(self) -> bool:
        """Whether ``var`` is a per-example covariance ``(..., F, F)``."""
        return self.var.dim() == self.mean.dim() + 1

    def total_var(self) -> torch.Tensor:
        """Variances ``(..., F)`` including the shared part."""
        v = self.var.diagonal(dim1=-2, dim2=-1) if self.full else self.var
        return v if self.A is None else v + (self.A ** 2).sum(-1)

    def total_cov(self) -> torch.Tensor:
        """Covariance ``(..., F, F)`` including the shared part (full activations only)."""
        return self.var if self.A is None else self.var + self.A @ self.A.transpose(-1, -2)


def _diag(x: Gaussian) -> torch.Tensor:
    return x.var.diagonal(dim1=-2, dim2=-1) if x.full else x.var


def linear(x: Gaussian, weight: torch.Tensor, bias: Optional[torch.Tensor],
           weight_var: Optional[torch.Tensor] = None, factor: Optional[torch.Tensor] = None) -> Gaussian:
    """Moments of ``h = W a + b`` (see the module docstring).

    :param x: input ``Gaussian`` with features ``in`` last.
    :param weight: weight mean ``(out, in)``; ``bias``: bias mean ``(out,)`` or ``None``.
    :param weight_var: independent variances of ``[W, b]``, ``(out, in + 1)``, or ``None``.
    :param factor: ``G``, ``(out, in + 1, r)``: the coefficients of the shared ``epsilon``, or ``None``.
    """
    mean, var, A = x
    out_mean = mean @ weight.T
    if bias is not None:
        out_mean = out_mean + bias
    if x.full:
        out_var = weight @ var @ weight.T
    else:
        out_var = var @ (weight ** 2).T
    out_A = None if A is None else torch.einsum("...ir,ki->...kr", A, weight)
    if weight_var is None and factor is None:
        return Gaussian(out_mean, out_var, out_A)
    one = torch.ones_like(mean[..., :1])
    mean1 = torch.cat([mean, one], -1)
    var1 = torch.cat([_diag(x), torch.zeros_like(one)], -1)
    if weight_var is not None:
        second = mean1 ** 2 + var1
        if A is not None:
            second = second + torch.cat([(A ** 2).sum(-1), torch.zeros_like(one)], -1)
        d = second @ weight_var.T
        out_var = out_var + (torch.diag_embed(d) if x.full else d)
    if factor is not None:
        gm = torch.einsum("kir,...i->...kr", factor, mean1)
        out_A = gm if out_A is None else out_A + gm
        if A is not None:
            out_mean = out_mean + torch.einsum("kir,...ir->...k", factor[:, :-1], A)
        if x.full:
            cross = torch.einsum("kir,lir->ikl", factor, factor)      # Cov_G(W_ki, W_li), once per layer
            out_var = out_var + torch.einsum("...i,ikl->...kl", var1, cross)
        else:
            out_var = out_var + var1 @ (factor ** 2).sum(-1).T
    return Gaussian(out_mean, out_var, out_A)


def _per_column(fn: Callable[[torch.Tensor], torch.Tensor], A: torch.Tensor) -> torch.Tensor:
    """Apply a batch-first linear map ``fn`` to each column of ``A`` ``(N, *shape, r)``."""
    N, r = A.shape[0], A.shape[-1]
    cols = A.movedim(-1, 0).reshape(r * N, *A.shape[1:-1])
    out = fn(cols)
    return out.reshape(r, N, *out.shape[1:]).movedim(0, -1)


def reshape(fn: Callable[[torch.Tensor], torch.Tensor], x: Gaussian) -> Gaussian:
    """A batch-first reshape (``Flatten``, ``Unflatten``) of diagonal activations."""
    return Gaussian(fn(x.mean), fn(x.var), None if x.A is None else _per_column(fn, x.A))


def add(x: Gaussian, y: Gaussian) -> Gaussian:
    """A residual sum ``x + y``: the shared parts add exactly; the independent parts are taken as
    uncorrelated (the paper's assumption), so their variances add."""
    A = x.A if y.A is None else (y.A if x.A is None else x.A + y.A)
    return Gaussian(x.mean + y.mean, x.var + y.var, A)


def elementwise(fn: Callable[[torch.Tensor], torch.Tensor], x: Gaussian) -> Gaussian:
    """Local linearisation of an elementwise function at the mean: :math:`\\mu' = g(\\mu)`,
    :math:`\\Sigma' = J \\Sigma J`, :math:`A' = J A` with :math:`J = \\mathrm{diag}(g'(\\mu))` (``g'``
    by forward-mode autodiff, so any elementwise function works: ReLU, GELU, SiLU, tanh, ...)."""
    out, slope = torch.func.jvp(fn, (x.mean,), (torch.ones_like(x.mean),))
    var = slope.unsqueeze(-1) * x.var * slope.unsqueeze(-2) if x.full else slope ** 2 * x.var
    return Gaussian(out, var, None if x.A is None else slope.unsqueeze(-1) * x.A)


def layer_norm(x: Gaussian, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
               weight_var: Optional[torch.Tensor] = None, bias_var: Optional[torch.Tensor] = None) -> Gaussian:
    """``LayerNorm`` over the last dimension, linearised at the mean.

    With :math:`\\hat x = (\\mu - \\bar\\mu)/s`, :math:`s = \\sqrt{\\mathrm{Var}_d(\\mu) + \\epsilon}`, the
    Jacobian is :math:`J = \\mathrm{diag}(\\gamma)\\, s^{-1} P`,
    :math:`P = I - \\tfrac1F 1 1^\\top - \\tfrac1F \\hat x \\hat x^\\top` (the exact derivative with the
    centring; the paper's code keeps only :math:`\\gamma^2 / s^2`). Gaussian ``gamma, beta`` with
    (marginal) variances ``weight_var``, ``bias_var``, taken independent, add
    :math:`\\mathrm{Var}(\\gamma)(\\hat x^2 + \\mathrm{Var}(\\hat x)) + \\mathrm{Var}(\\beta)` on the diagonal.
    """
    mean, var, A = x
    F = mean.shape[-1]
    s = (mean.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    xhat = (mean - mean.mean(-1, keepdim=True)) / s
    gamma = torch.ones_like(mean) if weight is None else weight.expand_as(mean)
    eye = torch.eye(F, dtype=mean.dtype, device=mean.device)
    P = eye - 1.0 / F - xhat.unsqueeze(-1) * xhat.unsqueeze(-2) / F
    J = (gamma / s).unsqueeze(-1) * P
    out_mean = gamma * xhat + (0 if bias is None else bias)
    if x.full:
        out_var = J @ var @ J.transpose(-1, -2)
        xvar = (P @ var @ P.transpose(-1, -2)).diagonal(dim1=-2, dim2=-1) / s ** 2
    else:
        out_var = ((J ** 2) @ var.unsqueeze(-1)).squeeze(-1)
        xvar = ((P ** 2) @ var.unsqueeze(-1)).squeeze(-1) / s ** 2
    out_A = None
    if A is not None:
        out_A = J @ A
        xvar = xvar + ((P @ A) ** 2).sum(-1) / s ** 2
    extra = 0
    if weight_var is not None:
        extra = extra + weight_var * (xhat ** 2 + xvar)
    if bias_var is not None:
        extra = extra + bias_var
    if torch.is_tensor(extra):
        out_var = out_var + (torch.diag_embed(extra) if x.full else extra)
    return Gaussian(out_mean, out_var, out_A)


def conv2d(x: Gaussian, weight: torch.Tensor, bias: Optional[torch.Tensor], weight_var: Optional[torch.Tensor],
           bias_var: Optional[torch.Tensor], factor_w: Optional[torch.Tensor], factor_b: Optional[torch.Tensor],
           **conv) -> Gaussian:
    """``Conv2d`` with Gaussian weights on diagonal activations ``(N, C, H, W)`` (``A``: ``(N, C, H, W, r)``).

    Per output pixel this is the linear layer over its receptive field (``*`` the convolution):
    :math:`\\mu' = \\mu * M + b`, :math:`A' = A * M + \\mu * G + g`,
    :math:`v' = v * M^2 + (\\mu^2 + v + \\textstyle\\sum_r A_r^2) * V + V_b + v * \\textstyle\\sum_r G_r^2`;
    covariances between output pixels and channels of the independent part are dropped.

    :param factor_w: ``G`` as ``(r, C_out, C_in, kh, kw)``; ``factor_b``: ``(r, C_out)``.
    """
    f = torch.nn.functional.conv2d
    mean, var, A = x
    out_mean = f(mean, weight, bias, **conv)
    out_var = f(var, weight ** 2, None, **conv)
    out_A = None if A is None else _per_column(lambda c: f(c, weight, None, **conv), A)
    if weight_var is not None:
        second = mean ** 2 + var + (0 if A is None else (A ** 2).sum(-1))
        out_var = out_var + f(second, weight_var, None, **conv)
    if bias_var is not None:
        out_var = out_var + bias_var[:, None, None]
    if factor_w is not None:
        r, co = factor_w.shape[:2]
        z = f(mean, factor_w.reshape(r * co, *factor_w.shape[2:]), factor_b.reshape(-1), **conv)
        z = z.reshape(z.shape[0], r, co, *z.shape[2:]).movedim(1, -1)
        out_A = z if out_A is None else out_A + z
        if A is not None:
            # E[(G eps) * (A eps)] = sum_r A_r * G_r
            cols = A.movedim(-1, 1).reshape(A.shape[0], -1, *A.shape[2:4])      # (N, r*C_in, H, W)
            g = factor_w.transpose(0, 1).reshape(co, -1, *factor_w.shape[3:])   # (C_out, r*C_in, kh, kw)
            if conv.get("groups", 1) != 1:
                raise NotImplementedError("AnalyticPredictive: grouped Conv2d with correlated weights is not supported.")
            out_mean = out_mean + f(cols, g, None, **conv)
        out_var = out_var + f(var, (factor_w ** 2).sum(0), None, **conv)
    return Gaussian(out_mean, out_var, out_A)


def attention_values(v: Gaussian, attn: torch.Tensor) -> Gaussian:
    """Attention output :math:`O_t = \\sum_s \\alpha_{ts} V_s` with a fixed attention matrix
    :math:`\\alpha` (from the mean queries and keys) and Gaussian values whose independent parts are
    independent across tokens: :math:`\\mathbb E[O] = \\alpha\\,\\mathbb E[V]`,
    :math:`A_O = \\alpha A_V`, :math:`\\mathrm{Var}[\\eta_O] = \\alpha^{\\circ 2}\\,\\mathrm{Var}[\\eta_V]`.

    :param v: values with mean/var ``(N, H, T, d)`` and ``A`` ``(N, H, T, d, r)``; ``attn``: ``(N, H, T, T)``.
    """
    A = None if v.A is None else torch.einsum("nhts,nhsdr->nhtdr", attn, v.A)
    return Gaussian(attn @ v.mean, (attn ** 2) @ v.var, A)


def probit_softmax(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Class probabilities by the probit approximation,
    :math:`\\mathrm{softmax}(\\mu / \\sqrt{1 + \\tfrac{\\pi}{8} v})` (MacKay, 1992; uses the
    variances of the logits)."""
    return torch.softmax(mean / torch.sqrt(1 + torch.pi / 8 * var), dim=-1)
