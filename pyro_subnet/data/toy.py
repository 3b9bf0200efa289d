"""Generated toy problems: in-between uncertainty in 1D, two moons, and conjugate linear
regression with its exact posterior (the reference every inference test can check against)."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from .datasets import Dataset


def gap_regression(n: int = 100, noise: float = 0.1, seed: int = 0, dtype=torch.float32,
                   num_test: int = 200) -> Dataset:
    """1D regression with a gap between two clusters of inputs (Foong et al., 2019).

    Inputs are uniform on ``[-2, -1] U [1, 2]`` (half in each cluster), targets
    ``y = sin(3x) + 0.3 x + noise * eps``. The test inputs are a grid on ``[-3, 3]``, so the
    predictive uncertainty inside the gap ``(-1, 1)`` and outside the data can be read off.
    """
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    x = torch.cat([torch.rand(half, generator=g) - 2.0, torch.rand(n - half, generator=g) + 1.0])
    f = lambda t: torch.sin(3 * t) + 0.3 * t
    y = f(x) + noise * torch.randn(n, generator=g)
    xt = torch.linspace(-3, 3, num_test)
    return Dataset("gap_regression", x[:, None].to(dtype), y.to(dtype), xt[:, None].to(dtype),
                   f(xt).to(dtype), "regression", 1)


def two_moons(n: int = 200, noise: float = 0.1, seed: int = 0, dtype=torch.float32,
              test_fraction: float = 0.3) -> Dataset:
    """Two interleaving half circles, 2 classes (the classic ``make_moons``, generated here)."""
    g = torch.Generator().manual_seed(seed)
    n0 = n // 2
    t0 = math.pi * torch.rand(n0, generator=g)
    t1 = math.pi * torch.rand(n - n0, generator=g)
    x0 = torch.stack([torch.cos(t0), torch.sin(t0)], 1)
    x1 = torch.stack([1 - torch.cos(t1), 0.5 - torch.sin(t1)], 1)
    x = torch.cat([x0, x1]) + noise * torch.randn(n, 2, generator=g)
    y = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n - n0, dtype=torch.long)])
    perm = torch.randperm(n, generator=g)
    x, y = x[perm], y[perm]
    n_test = int(round(test_fraction * n))
    return Dataset("two_moons", x[n_test:].to(dtype), y[n_test:], x[:n_test].to(dtype), y[:n_test],
                   "classification", 2)


class ConjugateRegression(NamedTuple):
    """Data of a Bayesian linear regression and its closed-form posterior over ``(weight, bias)``."""

    x: torch.Tensor              # (n, d)
    y: torch.Tensor              # (n,)
    design: torch.Tensor         # (n, d + 1): x with a column of ones, in the layout (weight, bias)
    posterior_mean: torch.Tensor # (d + 1,)
    posterior_cov: torch.Tensor  # (d + 1, d + 1)
    log_evidence: float          # log p(y | x)


def conjugate_regression(n: int = 60, weights: Sequence[float] = (1.0, -0.5), bias: float = 0.3,
                         noise: float = 0.5, prior_scale: float = 1.0, seed: int = 0,
                         dtype=torch.float64) -> ConjugateRegression:
    """``y = x w + b + noise * eps`` with ``x, eps ~ N(0, I)`` and a ``N(0, prior_scale^2)`` prior on
    every coefficient: the posterior is :math:`N(\\Sigma X^\\top y / \\sigma^2, \\Sigma)`,
    :math:`\\Sigma = (X^\\top X / \\sigma^2 + I / s^2)^{-1}`, and the evidence
    :math:`N(y; 0, s^2 X X^\\top + \\sigma^2 I)`, with :math:`X = [x, 1]`. It is the reference for
    ``BayesianNet(nn.Linear(d, 1), "regression", prior_scale=s, noise_scale=sigma)``.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor(weights, dtype=dtype)
    x = torch.randn(n, len(w), generator=g, dtype=dtype)
    y = x @ w + bias + noise * torch.randn(n, generator=g, dtype=dtype)
    X = torch.cat([x, torch.ones(n, 1, dtype=dtype)], 1)
    eye = torch.eye(X.shape[1], dtype=dtype)
    cov = torch.linalg.inv(X.T @ X / noise ** 2 + eye / prior_scale ** 2)
    marginal = torch.distributions.MultivariateNormal(
        torch.zeros(n, dtype=dtype), prior_scale ** 2 * X @ X.T + noise ** 2 * torch.eye(n, dtype=dtype))
    return ConjugateRegression(x, y, X, cov @ X.T @ y / noise ** 2, cov, float(marginal.log_prob(y)))
