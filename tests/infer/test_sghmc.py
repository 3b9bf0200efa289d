"""SGHMC against the closed-form posterior of conjugate Bayesian linear regression, and its
contracts with pyro.infer.MCMC and ArviZ."""

import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC
from torch import nn

from pyro_subnet.infer import SGHMC
from pyro_subnet.infer.mcmc import CyclicalCosine, PolynomialDecay, add_sample_stats, sample_stats
from pyro_subnet.nn import BayesianNet

N, D, SIGMA = 100, 3, 1.0


def _problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    y = x @ torch.tensor([1.0, -0.5, 0.3], dtype=dtype) + SIGMA * torch.randn(N, generator=g, dtype=dtype)
    # Exact posterior of w ~ N(0, I), y | x, w ~ N(x w, SIGMA^2): precision A, mean A^{-1} x^T y / SIGMA^2.
    A = x.T @ x / SIGMA ** 2 + torch.eye(D, dtype=dtype)
    cov = torch.linalg.inv(A)
    return x, y, cov @ x.T @ y / SIGMA ** 2, cov


def _model(dtype=torch.float64, **kw):
    net = nn.Linear(D, 1, bias=False).to(dtype)
    return BayesianNet(net, likelihood="regression", noise_scale=SIGMA, prior_scale=1.0, **kw)


@pytest.mark.parametrize("preconditioner, subsample_size", [(None, None), (None, 50), ("vb", None), ("rmsprop", 50)])
def test_conjugate_linear_regression_matches_exact_posterior(preconditioner, subsample_size):
    torch.set_num_threads(1)   # tiny tensors: threads only add latency
    x, y, mean, cov = _problem()
    # step * largest curvature (~120) ~ 0.1: discretisation bias of the variance ~3%.
    kernel = SGHMC(_model(), step_size=8e-4, friction=0.5, preconditioner=preconditioner,
                   subsample_size=subsample_size, steps_per_sample=5)
    # Start at the posterior mean's neighbourhood is not needed: warm-up covers it.
    mcmc = MCMC(kernel, num_samples=1000, warmup_steps=300, disable_progbar=True)
    mcmc.run(x, y)
    w = mcmc.get_samples()["weight"].reshape(-1, D)
    sd = cov.diag().sqrt()
    assert ((w.mean(0) - mean).abs() / sd).max() < 0.1
    ratio = w.var(0) / cov.diag()
    assert ((ratio - 1).abs() < 0.2).all(), ratio
    assert mcmc.diagnostics()["divergences"]["chain 0"] == []
