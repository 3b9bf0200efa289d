
import pytest
import torch
from pyro.infer import Predictive
from torch import nn

import pyro_subnet as ps
from pyro_subnet.infer import AutoSampledLaplace, AutoSubnetLaplace

D_IN, N, NOISE = 4, 60, 0.5


def _blr(prior_scale=1.0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, -0.5, 0.3, 0.0], dtype=torch.float64)
    y = x @ w + 0.2 + NOISE * torch.randn(N, generator=g, dtype=torch.float64)
    model = ps.nn.BayesianNet(nn.Linear(D_IN, 1).double(), "regression", prior_scale=prior_scale, noise_scale=NOISE)
    X = torch.cat([x, torch.ones(N, 1, dtype=torch.float64)], 1)  # layout: weight (4), then bias
    return model, x, y, X


def _exact(X, y, lam):
    H = X.T @ X / NOISE ** 2 + lam * torch.eye(X.shape[1], dtype=X.dtype)
    Sigma = torch.linalg.inv(H)
    return Sigma @ X.T @ y / NOISE ** 2, Sigma


def _log_ml(X, y, lam):
    C = NOISE ** 2 * torch.eye(len(y), dtype=X.dtype) + X @ X.T / lam
    return torch.distributions.MultivariateNormal(torch.zeros(len(y), dtype=X.dtype), C).log_prob(y)


def test_conjugate_regression_samples_match_the_exact_posterior():
    model, x, y, X = _blr(prior_scale=0.8)
    K = 1000
    guide = AutoSampledLaplace(model, num_posterior_samples=K, map_steps=0, tol=1e-10, newton_step=True,
                               progress=False)
    guide.fit(x, y)
    mean, Sigma = _exact(X, y, 1 / 0.64)
    assert torch.allclose(guide.loc, mean, atol=1e-7)          # the linearised mean is exact here
    Z = guide.samples
    se_mean = (Sigma.diagonal() / K).sqrt()
    assert (Z.mean(0).abs() < 3 * se_mean).all()
    cov = Z.T @ Z / K
    se = ((Sigma.diagonal()[:, None] * Sigma.diagonal()[None] + Sigma ** 2) / K).sqrt()
    assert ((cov - Sigma).abs() < 3 * se).float().mean() >= 0.96 and ((cov - Sigma).abs() < 4 * se).all()


def test_em_finds_the_evidence_maximising_prior_precision():
    model, x, y, X = _blr()
    guide = AutoSampledLaplace(model, num_posterior_samples=2000, prior_precision="em", num_em_steps=30,
                               em_tol=1e-4, map_steps=0, tol=1e-8, progress=False)
    guide.fit(x, y)
    grid = torch.logspace(-3, 3, 4001, dtype=torch.float64)
    best = grid[torch.stack([_log_ml(X, y, float(l)) for l in grid]).argmax()]
    assert abs(float(guide.prior_prec[0]) / float(best) - 1) < 0.05
    # and the samples then follow the exact posterior at that precision
    _, Sigma = _exact(X, y, float(guide.prior_prec[0]))
    assert torch.allclose(guide.samples.var(0), Sigma.diagonal(), rtol=0.15)


def test_predictive_variance_agrees_with_the_dense_subnet_guide():
    torch.manual_seed(0)
    ds = ps.data.gap_regression(n=60, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1)).double()
    model = ps.nn.BayesianNet(net, "regression", noise_scale=0.1)
    theta = ps.infer.fit_map(model, ds.x_train, ds.y_train, num_steps=600, lr=0.02, batch_size=None,
                             progress=False).theta
    idx = torch.randperm(model.layout.dim)[:30]
    dense = AutoSubnetLaplace(model, subnet=idx, prior_precision=1.0, progress=False).fit(
        ds.x_train, ds.y_train, map_theta=theta)
    sampled = AutoSampledLaplace(model, subnet=idx, prior_precision=1.0, num_posterior_samples=1024,
                                 tol=1e-8, progress=False).fit(ds.x_train, ds.y_train, map_theta=theta)
    _, v_dense = dense.predict(ds.x_test, observation_noise=False)
    _, v_sampled = sampled.predict(ds.x_test, observation_noise=False)
    assert float(((v_sampled - v_dense).abs() / v_dense).mean()) < 0.10


def test_pyro_predictive_and_state_dict():
    model, x, y, X = _blr()
    guide = AutoSampledLaplace(model, num_posterior_samples=32, map_steps=0, progress=False).fit(x, y)
    for parallel in (False, True):
        out = Predictive(model, guide=guide, num_samples=50, parallel=parallel)(x)
        w = out["weight"].reshape(50, -1)
        # every draw is a stored sample or its mirror image about the MAP (antithetic pairs)
        allowed = guide.loc[:4] + torch.cat([guide.samples[:, :4], -guide.samples[:, :4]])       # (2K, 4)
        assert (w[:, None] - allowed[None]).abs().amax(-1).min(1).values.max() < 1e-12
    fresh = AutoSampledLaplace(model, num_posterior_samples=32, progress=False)
    fresh.load_state_dict(guide.state_dict())
    m1, v1 = guide.predict(x)
    m2, v2 = fresh.predict(x)
    assert torch.allclose(m1, m2) and torch.allclose(v1, v2)
    q = guide.quantiles([0.5])
    assert torch.allclose(q["bias"][0], guide.median()["bias"])
    with pytest.raises(ValueError, match="solver"):
        AutoSampledLaplace(model, solver="adam")


def test_layerwise_em_matches_the_exact_fixed_point():
    """Per-site EM from the samples converges where MacKay's update with the exact posterior does
    (prior_lib.tune_em on the dense GGN, one group per site: the weight and the bias)."""
    from pyro_subnet.infer.autoguide import prior as prior_lib
    model, x, y, X = _blr()
    guide = AutoSampledLaplace(model, num_posterior_samples=2000, prior_precision="em", prior_structure="layerwise",
                               num_em_steps=40, em_tol=1e-4, map_steps=0, tol=1e-8, newton_step=True,
                               progress=False).fit(x, y)
    G = X.T @ X / NOISE ** 2
    idx = torch.arange(5)
    groups = prior_lib.structure_groups("layerwise", model.layout, idx)
    mean, _ = _exact(X, y, 1.0)
    # the EM fixed point of the linear model: theta_bar at each iterate's precision
    p = torch.ones(5, dtype=torch.float64)
    for _ in range(500):
        H = G + torch.diag(p)
        mean = torch.linalg.solve(H, X.T @ y / NOISE ** 2)
        p = prior_lib.tune_em(G, mean, groups, p, max_iter=1)
    assert torch.allclose(guide.prior_prec, p, rtol=0.08)
    assert not torch.allclose(guide.prior_prec[:4], guide.prior_prec[4:].expand(4), rtol=0.1)  # two groups
