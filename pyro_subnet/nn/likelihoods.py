"""Likelihoods of a network's output ``f`` and their curvature in ``f``.

A likelihood turns the network output ``f`` of shape ``(..., N, O)`` into the distribution of the
observed site, and gives the Hessian of the negative log-likelihood in ``f``,

.. math:: \\Lambda_n = -\\partial^2_f \\log p(y_n \\mid f_n),

which is the middle factor of the generalised Gauss-Newton matrix
:math:`G = \\sum_n J_n^\\top \\Lambda_n J_n`. For every likelihood here :math:`\\Lambda_n` does not
depend on ``y``, and a square root :math:`L_n L_n^\\top = \\Lambda_n` is known in closed form, so
that :math:`G = \\sum_n (L_n^\\top J_n)^\\top (L_n^\\top J_n)` is one matrix product.

The classes are named after the Pyro distribution of the observed site they describe:
:class:`Normal` (regression), :class:`Categorical` and :class:`Bernoulli` (classification).
"""

from __future__ import annotations

import math
from typing import Optional

import pyro.distributions as dist
import torch


class Likelihood:
    """Base class: the observation model of a :class:`~pyro_subnet.nn.BayesianNet`."""

    name: str = ""

    def distribution(self, f: torch.Tensor) -> dist.Distribution:
        """Distribution of ``obs`` with batch shape ``f.shape[:-1]``."""
        raise NotImplementedError

    def log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pointwise ``log p(y_n | f_n)``, shape ``f.shape[:-1]``."""
        return self.distribution(f).log_prob(y)

    def log_prob_sum(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``sum_n log p(y_n | f_n)`` for one weight draw (``f`` of shape ``(N, O)``)."""
        return self.log_prob(f, y).sum()

    def output_hessian(self, f: torch.Tensor) -> torch.Tensor:
        """:math:`\\Lambda_n`, shape ``(..., N, O, O)``."""
        L = self.output_hessian_sqrt(f)
        return L @ L.transpose(-1, -2)

    def output_hessian_sqrt(self, f: torch.Tensor) -> torch.Tensor:
        """A factor ``L_n`` with :math:`L_n L_n^\\top = \\Lambda_n`, shape ``(..., N, O, O)``."""
        raise NotImplementedError


class Categorical(Likelihood):
    """``y_n ~ Categorical(softmax(f_n))``.

    :math:`\\Lambda_n = \\mathrm{diag}(p_n) - p_n p_n^\\top` with
    :math:`L_n = \\mathrm{diag}(\\sqrt{p_n}) - p_n \\sqrt{p_n}^\\top` (this uses
    :math:`\\sum_c p_{nc} = 1`).
    """

    name = "classification"

    def distribution(self, f):
        return dist.Categorical(logits=f)

    def log_prob_sum(self, f, y):
        return -torch.nn.functional.cross_entropy(f, y, reduction="sum")  # one fused kernel

    def output_hessian(self, f):
        p = torch.softmax(f, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def output_hessian_sqrt(self, f):
        p = torch.softmax(f, dim=-1)
        s = p.sqrt()
        return torch.diag_embed(s) - p.unsqueeze(-1) * s.unsqueeze(-2)

    def __repr__(self):
        return "Categorical()"


class Bernoulli(Likelihood):
    """``y_n ~ Bernoulli(sigmoid(f_n))`` with one logit per example (``f`` of shape ``(N, 1)``, ``y``
    of 0/1 values): :math:`\\Lambda_n = p_n (1 - p_n)`, :math:`L_n = \\sqrt{p_n (1 - p_n)}`."""

    name = "binary"

    def distribution(self, f):
        return dist.Bernoulli(logits=f[..., 0])

    def log_prob_sum(self, f, y):
        return -torch.nn.functional.binary_cross_entropy_with_logits(f[..., 0], y.to(f), reduction="sum")

    def output_hessian_sqrt(self, f):
        p = torch.sigmoid(f)
        return (p * (1 - p)).sqrt().unsqueeze(-1)

    def __repr__(self):
        return "Bernoulli()"


class Normal(Likelihood):
    """``y_n ~ Normal(f_n, noise_scale^2)``, one output (``y`` of shape ``(N,)``) or several
    (``y`` of shape ``(N, O)``, independent noise). :math:`\\Lambda_n = \\sigma^{-2} I`."""

    name = "regression"

    def __init__(self, noise_scale: Optional[float] = 0.1, initial_noise_scale: float = 1.0):
        #: ``True`` when the noise is a hyperparameter that the inference method learns (by the
        #: evidence for the Laplace guides, by EM for the samplers), ``noise_scale=None``.
        self.learn_noise = noise_scale is None
        if noise_scale is None:
            noise_scale = initial_noise_scale
        self.set_noise_scale(noise_scale)

    def set_noise_scale(self, noise_scale: float) -> None:
        noise_scale = float(noise_scale)
        if not (noise_scale > 0 and math.isfinite(noise_scale)):
            raise ValueError(f"Gaussian likelihood: noise_scale must be a positive number, got {noise_scale!r}.")
        self.noise_scale = noise_scale

    def distribution(self, f, noise_scale=None):
        scale = self.noise_scale if noise_scale is None else noise_scale
        # A scale passed in comes from a sampler's or optimiser's proposal: no argument checks
        # there (a rejected proposal may hold NaN), the model's own distribution keeps Pyro's.
        validate = None if noise_scale is None else False
        if f.shape[-1] == 1:
            return dist.Normal(f[..., 0], scale, validate_args=validate)
        return dist.Normal(f, scale, validate_args=validate).to_event(1)

    def log_prob_sum(self, f, y):
        r = (f[..., 0] if f.shape[-1] == 1 and y.dim() == f.dim() - 1 else f) - y
        s = self.noise_scale
        return -0.5 * (r * r).sum() / s ** 2 - r.numel() * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def output_hessian_sqrt(self, f):
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        return (eye / self.noise_scale).expand(*f.shape, f.shape[-1])

    def output_hessian(self, f):
        eye = torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        return (eye / self.noise_scale ** 2).expand(*f.shape, f.shape[-1])

    def __repr__(self):
        return f"Normal(noise_scale={self.noise_scale:.4g}{', learned' if self.learn_noise else ''})"


#: The name :class:`Normal` had first (``ps.nn.Gaussian``), kept so that code using it still runs.
Gaussian = Normal


def make_likelihood(likelihood, noise_scale: Optional[float] = 0.1) -> Likelihood:
    """``"classification"`` / ``"regression"`` / a :class:`Likelihood` -> a :class:`Likelihood`.
    ``noise_scale=None`` makes the regression noise a learned hyperparameter."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if likelihood == "classification":
        return Categorical()
    if likelihood == "regression":
        return Normal(noise_scale)
    raise ValueError(
        f"likelihood must be 'classification' or 'regression' (or a ps.nn.Likelihood), got {likelihood!r}."
    )
