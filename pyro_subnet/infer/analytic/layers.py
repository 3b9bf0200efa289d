"""Walking a torch network layer by layer with moments instead of values.

:func:`propagate` runs the plain network ``model.network.module`` on ``(mean, var)`` pairs: each
module is handled by the rule registered for its type in :data:`RULES` (a rule is
``rule(module, prefix, x, posterior) -> x`` on :class:`~.gaussian_activation.Gaussian` activations, where ``prefix`` is the module's
path, so that its weight sites are ``prefix + "weight"`` etc.). Containers (``nn.Sequential``,
``nn.TransformerEncoder``) are walked in order. A module with no rule raises an error that names
it; :func:`register` adds a rule for a new type.

What is exact and what is approximated:

* exact: ``Linear`` and ``Conv2d`` moments for a Gaussian input with any weight covariance
  within or across layers (full-rank, low-rank, subnetwork, diagonal), hence the whole predictive
  of a single linear layer on data (tested to 1e-5 against the closed form);
* carried to first order: correlated weights (a factor ``F``) through the shared standard normal
  ``epsilon`` (the ``A`` of :class:`~.gaussian_activation.Gaussian`), across layers, residual branches and
  attention;
* approximated: (1) activations: each unit's mean and variance are matched (exact for ReLU,
  a probit fit for tanh/sigmoid, quadrature otherwise) and covariances carried by the expected
  slope (``activations="moments"``, default), or everything linearised at the mean
  (``activations="linearise"``, the paper's choice); ``LayerNorm`` is linearised at the mean with
  the expected per-sample scale, its mean taken to second order; (2) independent
  weight noise is not correlated with later layers' inputs (its cross-layer correlation is
  dropped), and with diagonal activations covariances between features (and, in ``Conv2d``,
  between pixels sharing a kernel) are dropped; full activations keep them for MLPs;
  (3) attention: queries and keys (hence the attention matrix) are taken at the mean, only the
  value path is Gaussian, tokens' independent parts are independent (as in the paper); (4) the
  independent parts of a residual branch and its input are taken as uncorrelated; (5) where a
  layer's correlated weights meet a correlated input, the covariance of their products
  :math:`(G\\varepsilon)(A\\varepsilon)` (a product of two posterior variances; see
  :mod:`~.linear_moments`) is added by linear layers where it is cheap (``products="auto"`` with
  ``activations="moments"``: a subnetwork, not a dense factor over every weight) and dropped in
  ``Conv2d`` (what they change on a digits MLP: ``docs/measured.md``).

Where it is weakest: a ``LayerNorm`` applied to a residual stream that carries a heavy-tailed
attention branch. A mean-field posterior that leaves the query and key weights near the prior
makes the attention nearly one-hot on a random token, so the branch is a mixture rather than a
Gaussian, and normalising by its norm is where Gaussian moments go wrong: post-norm blocks are the
least accurate case, and neither exact attention moments nor an exact Gaussian ``LayerNorm`` fix
it, while the exact mean of the first LayerNorm's output does (the Gaussian form of its input is
the limit there; figures in ``docs/measured.md``).

With ``full`` activations (MLPs) a known input (the data) still gives a diagonal first layer
(exact) and covariances appear from the second linear layer on; with diagonal activations the
output layer (:func:`output_linear`) still returns the full covariance of the outputs.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Type

import torch
from torch import nn

from .. import links
from . import gaussian_activation, linear_moments, nonlinear_moments, norm_attention_moments
from .posterior import SitePosterior

Rule = Callable[[nn.Module, str, gaussian_activation.Gaussian, SitePosterior], gaussian_activation.Gaussian]
RULES: Dict[Type[nn.Module], Rule] = {}

ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
               nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.CELU, nn.SELU)
IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
#: Layers that only work with diagonal activations (their full covariance would be too large).
DIAGONAL_ONLY = (nn.Conv2d, nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.MultiheadAttention,
                 nn.Flatten, nn.Unflatten, nn.LayerNorm)


def register(module_type: Type[nn.Module]):
    """Decorator: register ``rule`` for ``module_type``."""
    def deco(rule: Rule) -> Rule:
        RULES[module_type] = rule
        return rule
    return deco


def rule_for(module: nn.Module, path: str) -> Rule:
    t = type(module)
    if t in RULES:
        return RULES[t]
    # A subclass that keeps its parent's forward (e.g. MultiheadAttention's out_proj) uses its rule.
    for base in t.__mro__[1:]:
        if base in RULES and t.forward is base.forward:
            return RULES[base]
    raise NotImplementedError(
        f"AnalyticPredictive: layer {t.__name__} (at {path or 'the root'!r}) is not supported. Supported: "
        f"{', '.join(sorted(k.__name__ for k in RULES))}; add a rule with "
        "pyro_subnet.infer.analytic.layers.register."
    )


def propagate(module: nn.Module, x: gaussian_activation.Gaussian, post: SitePosterior, prefix: str = "") -> gaussian_activation.Gaussian:
    """Moments of ``module``'s output for the input moments ``x``."""
    return rule_for(module, prefix)(module, prefix, x, post)


def output_linear(module: nn.Module, prefix: str = "") -> Optional[str]:
    """The prefix of the ``nn.Linear`` that produces the network's output (the last layer of nested
    ``nn.Sequential``), or ``None``: with diagonal activations it still returns the full covariance
    of the outputs (cheap: ``O x O`` per example), which the classification link uses."""
    if isinstance(module, nn.Linear):
        return prefix
    if hasattr(module, "output_prefix"):      # a traced forward (forward_trace.TracedNetwork)
        return module.output_prefix()
    if isinstance(module, nn.Sequential) and len(module):
        name, last = list(module.named_children())[-1]
        return output_linear(last, f"{prefix}{name}.")
    return None


def is_mlp(module: nn.Module) -> bool:
    """Whether every layer of the network can carry a per-example covariance between features
    (none of :data:`DIAGONAL_ONLY`: conv, attention, normalisation, reshapes)."""
    return not any(isinstance(m, DIAGONAL_ONLY) for m in module.modules())


def count_linear(module: nn.Module) -> int:
    """The number of ``nn.Linear`` layers in ``module`` (a traced forward's included)."""
    return sum(isinstance(m, nn.Linear) for m in module.modules())


def _require_diagonal(name, x):
    if x.full:
        raise ValueError(f"AnalyticPredictive: {name} needs diagonal activations; use covariance='diag'.")


# ------------------------------------------------------------------------------------------------
@register(nn.Sequential)
def _sequential(module, prefix, x, post):
    for name, child in module.named_children():
        x = propagate(child, x, post, f"{prefix}{name}.")
    return x


for _t in IDENTITY:
    RULES[_t] = lambda module, prefix, x, post: x

for _t in ELEMENTWISE:
    RULES[_t] = lambda module, prefix, x, post: _elementwise(module, x, post)


def _elementwise(fn, x, post):
    if post.activations == "moments":
        return nonlinear_moments.elementwise_moments(fn, x)
    return nonlinear_moments.elementwise(fn, x)


def _linear_params(post: SitePosterior, w: str, b: str, has_bias: bool, rows: slice = slice(None)):
    """Mean, independent variances ``(out, in+1)`` and factor ``(out, in+1, r)`` of ``[W, b]``, and
    which entries of the factor are correlated ``(out, in+1)``
    (:meth:`~.posterior.SitePosterior.linear_factor`)."""
    weight = post.mean[w][rows]
    bias = post.mean[b][rows] if has_bias else None
    wv = None
    if post.has_var[w] or (has_bias and post.has_var[b]):
        bv = post.var[b][rows] if has_bias else weight.new_zeros(weight.shape[0])
        wv = torch.cat([post.var[w][rows], bv[:, None]], 1)
    grid = post.linear_factor(w, b if has_bias else None)
    G = correlated = None
    if grid is not None:
        G, correlated = grid[0][rows], grid[1][rows]
    return weight, bias, wv, G, correlated


def _prepare_linear(post: SitePosterior, w: str, b: str, has_bias: bool, rows: slice = slice(None), **options):
    """:func:`~.linear_moments.prepare_linear` of ``[W, b]`` as :func:`_linear_params` reads it."""
    weight, bias, wv, G, correlated = _linear_params(post, w, b, has_bias, rows)
    return linear_moments.prepare_linear(weight, bias, wv, G, correlated=correlated, **options)


@register(nn.Linear)
def _linear(module, prefix, x, post):
    output = prefix == post.full_output_at
    # Full covariances of independent weights are carried as per-example columns of A (lifted) up to
    # the output layer, until A is as wide as the features: from there a covariance matrix is cheaper.
    lift = post.lift and not output and not x.full
    if lift and x.A is not None and x.A.shape[-1] >= x.mean.shape[-1]:
        x, lift = gaussian_activation.Gaussian(x.mean, x.total_cov()), False
    full = (post.full and not lift) or output
    exact = x.exact     # (the data: the first layer, whose input needs less of the weights' terms)
    lw = post.cached(("linear", prefix, full, exact), lambda: _prepare_linear(
        post, prefix + "weight", prefix + "bias", module.bias is not None, full=full, products=post.products,
        exact_input=exact))
    return linear_moments.linear(x, lw, full=full, products=post.products is not False, lift=lift)


@register(nn.Conv2d)
def _conv2d(module, prefix, x, post):
    _require_diagonal("Conv2d", x)
    if module.padding_mode != "zeros":
        raise NotImplementedError(f"AnalyticPredictive: Conv2d at {prefix!r} with padding_mode="
                                  f"{module.padding_mode!r} is not supported (only 'zeros').")
    w, b = prefix + "weight", prefix + "bias"
    has_bias = module.bias is not None
    names = [w, b] if has_bias else [w]
    grids = post.factor(names)
    fw = fb = None
    if grids is not None:
        fw = grids[0].movedim(-1, 0)
        fb = grids[1].movedim(-1, 0) if has_bias else fw.new_zeros(fw.shape[0], fw.shape[1])
    return linear_moments.conv2d(x, post.mean[w], post.mean[b] if has_bias else None,
                          post.independent_var(w), post.independent_var(b) if has_bias else None, fw, fb,
                          stride=module.stride, padding=module.padding, dilation=module.dilation,
                          groups=module.groups, products=post.products is not False)


@register(nn.Flatten)
def _flatten(module, prefix, x, post):
    _require_diagonal("Flatten", x)
    return gaussian_activation.reshape(module, x)


@register(nn.Unflatten)
def _unflatten(module, prefix, x, post):
    _require_diagonal("Unflatten", x)
    return gaussian_activation.reshape(module, x)


@register(nn.LayerNorm)
def _layer_norm(module, prefix, x, post):
    affine = module.elementwise_affine
    w, b = prefix + "weight", prefix + "bias"
    has_bias = affine and module.bias is not None
    if len(module.normalized_shape) != 1:
        raise NotImplementedError(f"AnalyticPredictive: LayerNorm at {prefix!r} over more than the last "
                                  "dimension is not supported.")
    return norm_attention_moments.layer_norm(x, post.mean[w] if affine else None, post.mean[b] if has_bias else None, module.eps,
                              post.marginal_var(w) if affine else None, post.marginal_var(b) if has_bias else None)


@register(nn.MultiheadAttention)
def _self_attention(module, prefix, x, post):
    """Self-attention ``(N, T, E)`` (batch first): attention matrix from the mean queries and keys,
    Gaussian values and output projection."""
    _require_diagonal("MultiheadAttention", x)
    mean = x.mean
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        raise NotImplementedError(f"AnalyticPredictive: MultiheadAttention at {prefix!r} with separate q/k/v "
                                  "projections, bias_k/bias_v or add_zero_attn is not supported.")
    E, H = module.embed_dim, module.num_heads
    d = E // H
    has_bias = module.in_proj_bias is not None
    w, b = prefix + "in_proj_weight", prefix + "in_proj_bias"
    Wm = post.mean[w]
    bm = post.mean[b] if has_bias else None
    q = mean @ Wm[:E].T + (0 if bm is None else bm[:E])
    k = mean @ Wm[E:2 * E].T + (0 if bm is None else bm[E:2 * E])
    N, T = mean.shape[:2]
    heads = lambda t: t.reshape(N, T, H, d).transpose(1, 2)  # noqa: E731  (N, H, T, d)
    attn = links.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d))
    lw = post.cached(("values", prefix), lambda: _prepare_linear(
        post, w, b, has_bias, rows=slice(2 * E, 3 * E), products=post.products))
    v = linear_moments.linear(x, lw, products=post.products is not False)
    r = None if v.A is None else v.A.shape[-1]
    v = gaussian_activation.Gaussian(heads(v.mean), heads(v.var),
                         None if v.A is None else v.A.reshape(N, T, H, d, r).transpose(1, 2))
    o = norm_attention_moments.attention_values(v, attn)
    o = gaussian_activation.Gaussian(o.mean.transpose(1, 2).reshape(N, T, E), o.var.transpose(1, 2).reshape(N, T, E),
                         None if o.A is None else o.A.transpose(1, 2).reshape(N, T, E, r))
    return propagate(module.out_proj, o, post, prefix + "out_proj.")


def _activation(fn, prefix, x, post):
    if isinstance(fn, nn.Module):
        return propagate(fn, x, post, prefix)
    return _elementwise(fn, x, post)


def _time_first(x: gaussian_activation.Gaussian) -> gaussian_activation.Gaussian:
    x = x.materialised()
    return gaussian_activation.Gaussian(x.mean.transpose(0, 1), x.var.transpose(0, 1),
                            None if x.A is None else x.A.transpose(0, 1))


@register(nn.TransformerEncoderLayer)
def _encoder_layer(module, prefix, x, post):
    """``x + SA(x)`` and ``x + FF(x)`` with LayerNorms (post-norm or ``norm_first``); each residual
    branch's independent part is treated as independent of its input, so those variances add."""
    _require_diagonal("TransformerEncoderLayer", x)
    batch_first = module.self_attn.batch_first
    if not batch_first:
        x = _time_first(x)

    def sa(h):
        return propagate(module.self_attn, h, post, prefix + "self_attn.")

    def ff(h):
        h = propagate(module.linear1, h, post, prefix + "linear1.")
        h = _activation(module.activation, prefix + "activation.", h, post)
        return propagate(module.linear2, h, post, prefix + "linear2.")

    def norm(i, h):
        return propagate(getattr(module, f"norm{i}"), h, post, f"{prefix}norm{i}.")

    if module.norm_first:
        x = gaussian_activation.add(x, sa(norm(1, x)))
        x = gaussian_activation.add(x, ff(norm(2, x)))
    else:
        x = norm(1, gaussian_activation.add(x, sa(x)))
        x = norm(2, gaussian_activation.add(x, ff(x)))
    return x if batch_first else _time_first(x)


@register(nn.TransformerEncoder)
def _encoder(module, prefix, x, post):
    for i, layer in enumerate(module.layers):
        x = propagate(layer, x, post, f"{prefix}layers.{i}.")
    if module.norm is not None:
        x = propagate(module.norm, x, post, prefix + "norm.")
    return x
