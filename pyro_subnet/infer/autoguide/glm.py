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

from typing import Optional, Tuple

import torch

from .. import links


def function_variance(F: torch.Tensor) -> torch.Tensor:
    """Marginal output variances ``diag(F F^T)``: ``(N, O, r) -> (N, O)``."""
    return F.pow(2).sum(-1)


def probit(f: torch.Tensor, F: torch.Tensor, binary: bool = False) -> torch.Tensor:
    """Class probabilities by the probit approximation (:func:`~pyro_subnet.infer.links.probit`)
    from the function-space factor: variances :math:`\\mathrm{diag}(F F^\\top)`."""
    return links.probit(f, function_variance(F), binary)


def gumbel_max(f: torch.Tensor, F: torch.Tensor, binary: bool = False) -> torch.Tensor:
    """Class probabilities :math:`\\mathbb E[\\mathrm{softmax}(f)]` under :math:`f \\sim \\mathcal N(\\mu,
    F F^\\top)` by the Gumbel-max identity with Clark's moments of a maximum
    (:func:`~pyro_subnet.infer.links.gumbel_max_softmax`): it uses the covariance between the
    logits, so a common shift of the logits (raw or normalised) changes nothing, as for Monte
    Carlo, where the per-class probit changes. A Bernoulli logit (``binary``) takes the probit, the
    standard approximation of the two-class integral."""
    if binary:
        return probit(f, F, binary=True)
    return links.gumbel_max_softmax(f, F @ F.transpose(-1, -2))


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
        part = links.probabilities(logits, binary).sum(0)
        total = part if total is None else total + part
        done += s
    return total / num_samples


def regression(f: torch.Tensor, F: torch.Tensor, noise_var: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Predictive mean and variance ``diag(F F^T) + noise_var`` of a Gaussian likelihood."""
    return f, function_variance(F) + noise_var
