"""Walking a torch network layer by layer with moments instead of values.

:func:`propagate` runs the plain network ``model.network.module`` on ``(mean, var)`` pairs: each
module is handled by the rule registered for its type in :data:`RULES` (a rule is
``rule(module, prefix, mean, var, posterior) -> (mean, var)``, where ``prefix`` is the module's
path, so that its weight sites are ``prefix + "weight"`` etc.). Containers (``nn.Sequential``,
``nn.TransformerEncoder``) are walked in order. A module with no rule raises an error that names
it; :func:`register` adds a rule for a new type.

What is exact and what is approximated:

* exact: ``Linear`` and ``Conv2d`` moments given a Gaussian input independent of the layer's
  weights, with any weight covariance within the layer (full-rank, low-rank, subnetwork,
  diagonal); hence the whole predictive of a single linear layer on data;
* approximated: (1) correlations between the weights of different layers, and between a layer's
  input and its weights, are dropped; (2) activations are linearised at the mean (``LayerNorm``
  too, with its statistics differentiated); (3) with diagonal activations, covariances between
  features are dropped (with full activations they are kept for MLPs, except that the term
  ``sum_r G_r Sigma G_r^T`` of a correlated weight posterior uses the diagonal of ``Sigma``);
  (4) attention: queries and keys (hence the attention matrix) are taken at the mean, only the
  value path is Gaussian, tokens are independent (as in the paper); (5) residual branches are
  treated as independent of their input.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Type

import torch
from torch import nn

from . import moments
from .posterior import SitePosterior

Rule = Callable[[nn.Module, str, torch.Tensor, torch.Tensor, SitePosterior], moments.Moments]
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


def propagate(module: nn.Module, mean: torch.Tensor, var: torch.Tensor, post: SitePosterior,
              prefix: str = "") -> moments.Moments:
    """Moments of ``module``'s output for input moments ``(mean, var)``."""
    return rule_for(module, prefix)(module, prefix, mean, var, post)


def prefers_diagonal(module: nn.Module, max_width: int = 256) -> bool:
    """Whether the network needs diagonal activations (conv, attention, normalisation, reshapes) or
    is too wide for a per-example covariance."""
    for m in module.modules():
        if isinstance(m, DIAGONAL_ONLY):
            return True
        if isinstance(m, nn.Linear) and m.out_features > max_width:
            return True
    return False


def _require_diagonal(name, mean, var):
    if moments.is_full(mean, var):
        raise ValueError(f"AnalyticPredictive: {name} needs diagonal activations; use covariance='diag'.")


# ------------------------------------------------------------------------------------------------
@register(nn.Sequential)
def _sequential(module, prefix, mean, var, post):
    for name, child in module.named_children():
        mean, var = propagate(child, mean, var, post, f"{prefix}{name}.")
    return mean, var


for _t in IDENTITY:
    RULES[_t] = lambda module, prefix, mean, var, post: (mean, var)

for _t in ELEMENTWISE:
    RULES[_t] = lambda module, prefix, mean, var, post: moments.elementwise(module, mean, var)


def _linear_params(post: SitePosterior, w: str, b: str, has_bias: bool, rows: slice = slice(None)):
    """Mean, independent variances ``(out, in+1)`` and factor ``(out, in+1, r)`` of ``[W, b]``."""
    weight = post.mean[w][rows]
    bias = post.mean[b][rows] if has_bias else None
    names = [w, b] if has_bias else [w]
    wv = None
    if post.has_var[w] or (has_bias and post.has_var[b]):
        bv = post.var[b][rows] if has_bias else weight.new_zeros(weight.shape[0])
        wv = torch.cat([post.var[w][rows], bv[:, None]], 1)
    grids = post.factor(names)
    G = None
    if grids is not None:
        gb = grids[1][rows] if has_bias else grids[0].new_zeros(weight.shape[0], grids[0].shape[-1])
        G = torch.cat([grids[0][rows], gb[:, None, :]], 1)
    return weight, bias, wv, G


@register(nn.Linear)
def _linear(module, prefix, mean, var, post):
    weight, bias, wv, G = _linear_params(post, prefix + "weight", prefix + "bias", module.bias is not None)
    return moments.linear(mean, var, weight, bias, wv, G)


@register(nn.Conv2d)
def _conv2d(module, prefix, mean, var, post):
    _require_diagonal("Conv2d", mean, var)
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
    return moments.conv2d(mean, var, post.mean[w], post.mean[b] if has_bias else None,
                          post.independent_var(w), post.independent_var(b) if has_bias else None, fw, fb,
                          stride=module.stride, padding=module.padding, dilation=module.dilation,
                          groups=module.groups)


@register(nn.Flatten)
def _flatten(module, prefix, mean, var, post):
    _require_diagonal("Flatten", mean, var)
    return module(mean), module(var)


@register(nn.Unflatten)
def _unflatten(module, prefix, mean, var, post):
    _require_diagonal("Unflatten", mean, var)
    return module(mean), module(var)


@register(nn.LayerNorm)
def _layer_norm(module, prefix, mean, var, post):
    affine = module.elementwise_affine
    w, b = prefix + "weight", prefix + "bias"
    has_bias = affine and module.bias is not None
    return moments.layer_norm(mean, var, len(module.normalized_shape),
                              post.mean[w] if affine else None, post.mean[b] if has_bias else None, module.eps,
                              post.marginal_var(w) if affine else None, post.marginal_var(b) if has_bias else None)


@register(nn.MultiheadAttention)
def _self_attention(module, prefix, mean, var, post):
    """Self-attention ``(N, T, E)`` (batch first): attention matrix from the mean queries and keys,
    Gaussian values and output projection."""
    _require_diagonal("MultiheadAttention", mean, var)
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
    attn = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    weight, bias, wv, G = _linear_params(post, w, b, has_bias, rows=slice(2 * E, 3 * E))
    vm, vv = moments.linear(mean, var, weight, bias, wv, G)
    om, ov = moments.attention_values(heads(vm), heads(vv), attn)
    om, ov = om.transpose(1, 2).reshape(N, T, E), ov.transpose(1, 2).reshape(N, T, E)
    return propagate(module.out_proj, om, ov, post, prefix + "out_proj.")


def _activation(fn, prefix, mean, var, post):
    if isinstance(fn, nn.Module):
        return propagate(fn, mean, var, post, prefix)
    return moments.elementwise(fn, mean, var)


@register(nn.TransformerEncoderLayer)
def _encoder_layer(module, prefix, mean, var, post):
    """``x + SA(x)`` and ``x + FF(x)`` with LayerNorms (post-norm or ``norm_first``); each residual
    branch is treated as independent of its input, so the variances add."""
    _require_diagonal("TransformerEncoderLayer", mean, var)
    batch_first = module.self_attn.batch_first
    if not batch_first:
        mean, var = mean.transpose(0, 1), var.transpose(0, 1)

    def sa(m, v):
        return propagate(module.self_attn, m, v, post, prefix + "self_attn.")

    def ff(m, v):
        m, v = propagate(module.linear1, m, v, post, prefix + "linear1.")
        m, v = _activation(module.activation, prefix + "activation.", m, v, post)
        return propagate(module.linear2, m, v, post, prefix + "linear2.")

    def norm(i, m, v):
        return propagate(getattr(module, f"norm{i}"), m, v, post, f"{prefix}norm{i}.")

    def add(a, b):
        return a[0] + b[0], a[1] + b[1]

    x = (mean, var)
    if module.norm_first:
        x = add(x, sa(*norm(1, *x)))
        x = add(x, ff(*norm(2, *x)))
    else:
        x = norm(1, *add(x, sa(*x)))
        x = norm(2, *add(x, ff(*x)))
    mean, var = x
    if not batch_first:
        mean, var = mean.transpose(0, 1), var.transpose(0, 1)
    return mean, var


@register(nn.TransformerEncoder)
def _encoder(module, prefix, mean, var, post):
    for i, layer in enumerate(module.layers):
        mean, var = propagate(layer, mean, var, post, f"{prefix}layers.{i}.")
    if module.norm is not None:
        mean, var = propagate(module.norm, mean, var, post, prefix + "norm.")
    return mean, var
