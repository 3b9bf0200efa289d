"""The linearised (GLM) predictive from a factor of the function-space covariance.

Linearising the network around the MAP, :math:`f(x;\\theta) \\approx f(x;\\hat\\theta) +
J(x)(\\theta - \\hat\\theta)`, turns a Gaussian posterior over the weights into a Gaussian over the
outputs (Immer et al., 2021; Daxberger et al., 2021, sec. 4):

.. math:: f(x) \\sim \\mathcal{N}\\big(f(x;\\hat\\theta),\\; F(x) F(x)^\\top\\big).

Every guide supplies only the factor ``F`` of shape ``(N, O, r)``: the subnetwork Laplace guide
``F = J_S(x) L`` (``L`` the Cholesky factor of :math:`\\Sigma_S`), a sample-based guide
``F = [J \\zeta_1, ..., J \\zeta_K] / \\sqrt{K}``. The predictive functions below need nothing else,
and never factorise the ``O x O`` output covariance: Monte Carlo over the logits draws
``f + F \\epsilon`` with :math:`\\epsilon \\sim \\mathcal{N}(0, I_r)`, which is exact even where that
covariance is singular (softmax logits: it always is, along the all-ones direction).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def function_variance(F: torch.Tensor) -> torch.Tensor:
    """Marginal output variances ``diag(F F^T)``: ``(N, O, r) -> (N, O)``."""
    return F.pow(2).sum(-1)


def probabilities(logits: torch.Tensor, binary: bool = False) -> torch.Tensor:
    """Class probabilities ``(..., C)`` from logits: ``softmax``, or for one Bernoulli logit
    (``binary``, logits ``(..., 1)``) the two columns ``(1 - sigmoid, sigmoid)``."""
    if binary:
        p = torch.sigmoid(logits[..., 0])
        return torch.stack([1 - p, p], -1)
    return torch.softmax(logits, dim=-1)


def probit(f: torch.Tensor, F: torch.Tensor, binary: bool = False) -> torch.Tensor:
    """Class probabilities by the probit (mean-field) approximation (MacKay, 1992):
    :math:`\\mathrm{softmax}\\big(f / \\sqrt{1 + \\tfrac{\\pi}{8} \\mathrm{diag}(F F^\\top)}\\big)`
    (for a Bernoulli logit, ``binary``: :math:`\\sigma(f / \\sqrt{1 + \\tfrac{\\pi}{8} v})`)."""
    kappa = torch.rsqrt(1.0 + math.pi / 8.0 * function_variance(F))
    return probabilities(kappa * f, binary)


def mc_logits(f: torch.Tensor, F: torch.Tensor, num_samples: int = 100,
              generator: Optional[torch.Generator] = None, chunk: int = 64, binary: bool = False) -> torch.Tensor:
    """Class probabilities averaged over ``num_samples`` logit draws ``f + F eps``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    total = None
    done = 0
    while done < num_samples:
        s = min(chunk, num_samples - done)
        eps = torch.randn(s, F.shape[-1], dtype=F.dtype, device=F.device, generator=generator)
        logits = f + torch.einsum("nor,sr->sno", F, eps)
        part = probabilities(logits, binary).sum(0)
        total = part if total is None else total + part
        done += s
    return total / num_samples


def regression(f: torch.Tensor, F: torch.Tensor, noise_var: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Predictive mean and variance ``diag(F F^T) + noise_var`` of a Gaussian likelihood."""
    return f, function_variance(F) + noise_var
