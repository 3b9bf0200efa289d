"""Pointwise log-likelihoods of every particle at once, with one GEMM per layer for MLPs.

The SMC sampler evaluates ``log p(y_n | x_n, theta_i)`` and its gradient for all ``P`` particles
on the same examples. The generic path (:meth:`~pyro_subnet.nn.BayesianNet.log_likelihood`)
``vmap``s the network over the particles; for a linear layer that becomes a batched matmul of
the *expanded* input ``(P, n, in)`` with ``(P, in, out)`` weights, whose small inner dimensions
run far from the machine's matmul speed, and whose activations ``(P, n, H)`` are laid out so the
next batched matmul has a tiny output dimension.

For a plain ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations this module
evaluates the same function in a *particles x features x examples* layout:

.. math::

    H_1 = W_1^{\\text{stack}} X^\\top + b_1 \\quad ((P H_1) \\times n,\\ \\text{one GEMM: the input is
    shared by all particles}), \\qquad
    H_{k+1}^{(i)} = W_{k+1}^{(i)}\\, a(H_k^{(i)}) + b_{k+1}^{(i)} \\quad (\\text{one batched matmul}),

with every example in the long last dimension, so each matmul is a large, well-shaped GEMM and
the gradient (one backward pass over the summed log density) is the transposed GEMMs. There is
no loop over particles anywhere. The categorical log-likelihood is a ``log_softmax`` and a
``gather`` (no distribution object, whose argument validation costs as much as a layer).
Every other network or likelihood falls back to the model's own ``vmap`` path, so the results
never depend on which path ran (the tests compare them).

>>> from torch import nn
>>> from pyro_subnet.nn import BayesianNet, ModelBridge
>>> from pyro_subnet.infer.smc.particle_likelihood import particle_log_lik
>>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
>>> bridge = ModelBridge(BayesianNet(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), "classification"), x)
>>> theta = torch.randn(7, bridge.layout.dim)
>>> torch.allclose(particle_log_lik(bridge)(theta, x, y), bridge.log_likelihood(theta, x, y), atol=1e-5)
True
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ..curvature import linear_sites

# Modules that act elementwise, so they apply unchanged in any layout.
_ELEMENTWISE = (nn.Tanh, nn.ReLU, nn.Sigmoid, nn.Identity, nn.SiLU, nn.GELU, nn.ELU, nn.LeakyReLU, nn.Softplus,
                nn.Mish, nn.Hardtanh, nn.CELU, nn.SELU, nn.Softsign, nn.Tanhshrink)

# A layer plan: ("linear", weight site, bias site or None) or ("act", module).
Plan = List[Tuple]


def mlp_plan(network) -> Optional[Plan]:
    """The layers of a network function (:class:`~pyro_subnet.nn.FunctionalNet`) when it is a
    plain ``nn.Sequential`` of ``nn.Linear`` and elementwise activations whose weight sites are
    exactly the linear layers' parameters, in order (every site an ``nn.Linear`` parameter:
    :func:`~pyro_subnet.infer.curvature.linear_sites`); ``None`` otherwise (use the generic path)."""
    module = network.module
    if linear_sites(network) is None or type(module) is not nn.Sequential:
        return None
    plan, sites = [], []
    for name, m in module.named_children():
        if type(m) is nn.Linear:
            bias = f"{name}.bias" if m.bias is not None else None
            plan.append(("linear", f"{name}.weight", bias))
            sites += [f"{name}.weight"] + ([bias] if bias else [])
        elif isinstance(m, _ELEMENTWISE) and not list(m.parameters()):
            plan.append(("act", m))
        else:
            return None
    if not plan or plan[0][0] != "linear" or sites != network.layout.names:
        return None
    return plan


def mlp_outputs(network, plan: Plan, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Outputs ``(P, O, n)`` (features before examples) of the MLP ``plan`` for particles
    ``theta (P, D)`` on inputs ``x (n, in)``."""
    p, n = theta.shape[0], x.shape[0]
    # One split rather than a slice per site: its backward is one concatenation, where slices
    # each scatter into a zero (P, D) gradient that are then summed.
    shapes = network.layout.shapes
    parts = torch.split(theta, [math.prod(s) for s in shapes.values()], dim=-1)
    params = {name: v.reshape(p, *s) for (name, s), v in zip(shapes.items(), parts)}
    h = None
    for layer in plan:
        if layer[0] == "act":
            h = layer[1](h)
            continue
        _, w_name, b_name = layer
        w = params[w_name]                                      # (P, out, in)
        b = params[b_name].unsqueeze(-1) if b_name else None   # (P, out, 1)
        if h is None:   # first layer: the input is shared, so all particles are one GEMM
            out = w.shape[1]
            h = w.reshape(p * out, -1) @ x.t()
            h = h.view(p, out, n)
            if b is not None:
                h = h + b
        else:
            h = torch.baddbmm(b, w, h) if b is not None else torch.bmm(w, h)
    return h


def particle_log_lik(model) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(theta (P, D), x (n, ...), y (n, ...)) -> (P, n)`` pointwise log-likelihoods of a model's
    :class:`~pyro_subnet.nn.ModelBridge`, the same values as ``bridge.log_likelihood``, through
    the particles-x-features-x-examples MLP path when the network allows it."""
    plan = mlp_plan(model.network)
    classification = model.likelihood.name == "classification"

    def log_lik(theta, x, y):
        if plan is None or x.dim() != 2 or theta.dim() != 2:
            return model.log_likelihood(theta, x, y)
        f = mlp_outputs(model.network, plan, theta, x)           # (P, O, n)
        if classification:
            return torch.log_softmax(f, 1).gather(1, y.expand(f.shape[0], 1, -1)).squeeze(1)
        return model.likelihood.log_prob(f.transpose(1, 2), y)
    return log_lik


def particle_outputs(model) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(theta (P, D), x (n, in)) -> (P, n, O)``: ``model.network.flat_batched`` through the
    fast MLP path when the network allows it."""
    plan = mlp_plan(model.network)

    def outputs(theta, x):
        if plan is None or x.dim() != 2 or theta.dim() != 2:
            return model.network.flat_batched(theta, x)
        return mlp_outputs(model.network, plan, theta, x).transpose(1, 2)
    return outputs
