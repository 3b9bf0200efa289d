"""AutoSubnetLaplace against closed forms (conjugate Bayesian linear regression) and its Pyro contracts."""

import math

import pyro
import pytest
import torch
from torch import nn

import pyro_subnet as ps
from pyro_subnet.infer import AutoSubnetLaplace
from pyro_subnet.infer.autoguide import FlatGaussian, curvature
from pyro_subnet.infer.autoguide.linearised_laplace import broadest_within
from pyro_subnet.infer.autoguide.cholesky import NotPositiveDefiniteError, cholesky


def train(net, x, y, steps, lr=1e-2, classification=False, noise=0.1):
    """A trained network, the way a user brings one: plain torch, loss = -log joint / N with the
    unit Normal prior of BayesianNet (the guides then take it as the MAP with map_steps=0)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        out = net(x)
        nll = (nn.functional.cross_entropy(out, y) if classification
               else 0.5 * ((out[:, 0] - y) ** 2).mean() / noise ** 2)
        loss = nll + 0.5 * sum((p ** 2).sum() for p in net.parameters()) / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def blr_problem(n=40, d=3, noise=0.3, alpha=2.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64) + 0.2 + noise * torch.randn(n, generator=g, dtype=torch.float64)
    model = ps.nn.BayesianNet(nn.Linear(d, 1), likelihood="regression", noise_scale=noise, prior_scale=alpha ** -0.5)
    phi = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)       # layout: weight (1, d), then bias
    prec = alpha * torch.eye(d + 1, dtype=torch.float64) + phi.T @ phi / noise ** 2
    cov = torch.linalg.inv(prec)
    mean = cov @ phi.T @ y / noise ** 2
    return model, x, y, phi, mean, cov


def blr_evidence(phi, y, noise, alpha):
    K = noise ** 2 * torch.eye(len(y), dtype=phi.dtype) + phi @ phi.T / alpha
    return torch.distributions.MultivariateNormal(torch.zeros_like(y), K).log_prob(y)


def test_blr_posterior_and_evidence_match_closed_form():
    model, x, y, phi, mean, cov = blr_problem()
    guide = AutoSubnetLaplace(model, subnet=ps.subnet.All(), map_steps=0, newton_step=True, progress=False).fit(x, y)
    assert torch.allclose(guide.loc, mean, atol=1e-5, rtol=0)
    assert torch.allclose(guide.posterior_covariance, cov, atol=1e-5, rtol=0)
    assert torch.allclose(guide.log_marginal_likelihood(), blr_evidence(phi, y, 0.3, 2.0), atol=1e-5, rtol=0)
    fg = guide.flat_gaussian()
    assert isinstance(fg, FlatGaussian) and fg.indices.tolist() == [0, 1, 2, 3]
    assert torch.allclose(fg.scale_tril @ fg.scale_tril.T, cov, atol=1e-8)
    # GLM predictive: f(x*) variance = phi*^T Sigma phi*, plus noise.
    xs = torch.randn(5, 3, dtype=torch.float64)
    ps_ = torch.cat([xs, torch.ones(5, 1, dtype=torch.float64)], 1)
    m, v = guide.predict(xs)
    assert torch.allclose(m[:, 0], ps_ @ mean, atol=1e-6)
    assert torch.allclose(v[:, 0], (ps_ @ cov * ps_).sum(1) + 0.09, atol=1e-8)


def test_prior_tuning_marglik_equals_em_and_maximises_evidence():
    model, x, y, phi, mean, cov = blr_problem(n=30)
    fits = {m: AutoSubnetLaplace(model, subnet=ps.subnet.All(), prior_precision=m, map_steps=0,
                                 progress=False).fit(x, y) for m in ("marglik", "em")}
    a, b = fits["marglik"].prior_prec, fits["em"].prior_prec
    assert torch.allclose(a, b, rtol=1e-4)
    g = fits["marglik"]
    best = g.log_marginal_likelihood()
    for factor in (0.8, 1.25):
        assert g.log_marginal_likelihood(float(a[0]) * factor) < best
    # Layerwise tuning has more freedom: its evidence (at the same weights) is at least as high.
    lw = AutoSubnetLaplace(model, subnet=ps.subnet.All(), prior_precision="marglik", prior_structure="layerwise",
                           map_steps=0, newton_step=False, progress=False)
    lw.fit(x, y)
    sc = AutoSubnetLaplace(model, subnet=ps.subnet.All(), prior_precision="marglik", map_steps=0, progress=False).fit(x, y)
    assert lw.log_marginal_likelihood() >= sc.log_marginal_likelihood() - 1e-6
    assert lw.prior_prec[:3].unique().numel() == 1 and lw.prior_prec[3] != lw.prior_prec[0]
    # Per-layer and per-weight precisions are accepted as given.
    pl = AutoSubnetLaplace(model, subnet=ps.subnet.All(), prior_precision={"weight": 3.0, "*": 5.0}, map_steps=0,
                           progress=False).fit(x, y)
    assert pl.prior_prec.tolist() == [3.0, 3.0, 3.0, 5.0]


def small_regression(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.linspace(-2, 2, 30)[:, None]
    y = torch.sin(2 * x[:, 0])
    train(net, x, y, 300)
    return ps.nn.BayesianNet(net, likelihood="regression", noise_scale=0.1), x, y


def test_pyro_predictive_sequential_and_parallel_and_quantiles():
    model, x, y = small_regression()
    guide = AutoSubnetLaplace(model, subnet=ps.subnet.LargestMagnitude(5), map_steps=0, progress=False).fit(x, y)
    idx = guide.subnet_indices
    for parallel, S in ((False, 200), (True, 4000)):
        pred = pyro.infer.Predictive(model, guide=guide, num_samples=S, parallel=parallel,
                                     return_sites=list(model.layout.names) + ["obs"])(x)
        theta = model.layout.flatten({n: pred[n].reshape(S, *model.layout.shapes[n]) for n in model.layout.names})
        off = torch.ones(model.layout.dim, dtype=torch.bool)
        off[idx] = False
        assert torch.equal(theta[:, off], guide.loc[off].expand(S, -1))
        tol = 5 * guide._marginal_std() / math.sqrt(S)
        assert ((theta[:, idx].mean(0) - guide.loc[idx]).abs() <= tol).all()
        assert pred["obs"].shape[-1] == 30
        if parallel:
            emp_cov = torch.cov(theta[:, idx].T)
            assert torch.allclose(emp_cov, guide.posterior_covariance, atol=0.1 * guide.posterior_covariance.diagonal().max())
    med = guide.median()
    assert torch.equal(model.layout.flatten(med), guide.loc)
    q = model.layout.flatten(guide.quantiles([0.05, 0.5, 0.95]))
    std = guide._marginal_std()
    assert torch.allclose(q[1], guide.loc)
    assert torch.allclose(q[2, idx] - guide.loc[idx], 1.6448536 * std, rtol=1e-4)
    post = guide.get_posterior()
    assert torch.allclose(post.covariance_matrix, guide.posterior_covariance, atol=1e-6)


def test_state_dict_round_trip_and_dataloader_fit():
    model, x, y = small_regression()
    guide = AutoSubnetLaplace(model, subnet=ps.subnet.LargestMagnitude(6), map_steps=20, progress=False).fit(x, y)
    fresh = AutoSubnetLaplace(model, subnet=ps.subnet.LargestMagnitude(6), progress=False)
    fresh.load_state_dict(guide.state_dict())
    m0, v0 = guide.predict(x)
    m1, v1 = fresh.predict(x)
    assert torch.equal(m0, m1) and torch.equal(v0, v1)
    assert torch.allclose(fresh.log_marginal_likelihood(), guide.log_marginal_likelihood())
    # A DataLoader gives the same posterior as tensors (same MAP: map_steps=0 at those weights).
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    torch.nn.utils.vector_to_parameters(guide.loc, net.parameters())
    trained = ps.nn.BayesianNet(net, likelihood="regression", noise_scale=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    a = AutoSubnetLaplace(trained, subnet=guide.subnet_indices, map_steps=0, progress=False).fit(x, y)
    b = AutoSubnetLaplace(trained, subnet=guide.subnet_indices, map_steps=0, progress=False).fit(loader)
    assert torch.allclose(a.posterior_precision, b.posterior_precision, rtol=1e-5)
    assert torch.allclose(a.posterior_precision, guide.posterior_precision, rtol=1e-5)


def test_classification_mc_link_is_exact_on_singular_logit_covariance():
    torch.manual_seed(0)
    x = torch.randn(60, 2)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    net = train(nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)), x, y, 300, classification=True)
    model = ps.nn.BayesianNet(net, likelihood="classification")
    guide = AutoSubnetLaplace(model, subnet=ps.subnet.All(), map_steps=0, progress=False).fit(x, y)
    xt = torch.randn(8, 2)
    # The softmax logit covariance J S J^T is singular (only logit differences are identified
    # when the last bias is shared); the MC link must still work: compare with an independent
    # Monte Carlo through weight-space draws and the curvature core's jvp.
    gen = torch.Generator().manual_seed(0)
    mc = guide.predict(xt, link="mc", num_samples=6000, generator=gen)
    deltas = guide.get_posterior().sample((6000,)) - guide.loc[guide.subnet_indices]
    f, Jd = curvature.jvp(model.network, guide.loc, xt, deltas, guide.subnet_indices)
    ref = torch.softmax(f + Jd, -1).mean(0)
    assert torch.allclose(mc, ref, atol=0.02)
    assert torch.allclose(mc.sum(-1), torch.ones(8))
    probit = guide.predict(xt)
    assert torch.allclose(probit, ref, atol=0.08)
    nn_pred = guide.predict(xt, method="nn", num_samples=500)
    assert nn_pred.shape == (8, 3) and torch.allclose(nn_pred.sum(-1), torch.ones(8), atol=1e-5)


def test_gap_regression_std_larger_in_gap_than_on_data():
    ds = ps.data.gap_regression(n=60, noise=0.1)
    torch.manual_seed(0)
    net = train(nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1)), ds.x_train, ds.y_train, 1500, lr=2e-2)
    model = ps.nn.BayesianNet(net, likelihood="regression", noise_scale=0.1)
    guide = AutoSubnetLaplace(model, subnet=ps.subnet.PredictiveVariance(20), prior_precision=1.0, map_steps=0,
                              progress=False).fit(ds.x_train, ds.y_train)
    _, v = guide.predict(torch.tensor([[-1.5], [0.0], [1.5]]), observation_noise=False)
    std = v[:, 0].sqrt()
    assert std[1] > 3 * std[0] and std[1] > 3 * std[2]


def test_digits_glm_nll_no_worse_than_map():
    ds = ps.data.load_digits()
    torch.manual_seed(0)
    n_fit = 1000      # the rest of the training split is the validation set for the prior precision
    net = train(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)), ds.x_train[:n_fit],
                ds.y_train[:n_fit], 300, classification=True)
    model = ps.nn.BayesianNet(net, likelihood="classification")
    guide = AutoSubnetLaplace(model, subnet=ps.subnet.LargestMagnitude(300), prior_precision=1.0,
                              map_steps=0, batch_size=256, progress=False)
    guide.fit(ds.x_train[:n_fit], ds.y_train[:n_fit])
    chosen = guide.tune_prior_precision(ds.x_train[n_fit:], ds.y_train[n_fit:])
    assert torch.all(guide.prior_prec == chosen)
    probs = guide.predict(ds.x_test)
    with torch.no_grad():
        p_map = torch.softmax(model.network.flat(guide.loc, ds.x_test), -1)
    # Large grid values recover the MAP network, so "no worse" holds up to rounding.
    assert ps.metrics.nll(probs, ds.y_test) <= ps.metrics.nll(p_map, ds.y_test) + 1e-4
    assert abs(ps.metrics.accuracy(probs, ds.y_test) - ps.metrics.accuracy(p_map, ds.y_test)) < 0.01
    # validation_tolerance: the broadest posterior within 20% of the best held-out NLL, checked
    # against the scores of every grid value computed one at a time.
    x_val, y_val = ds.x_train[n_fit:], ds.y_train[n_fit:]
    grid = torch.logspace(-1, 4, 11).tolist()
    scores = []
    for p in grid:
        guide.tune_prior_precision(x_val, y_val, grid=[p])
        scores.append(ps.metrics.nll(guide.predict(x_val), y_val))
    guide.validation_tolerance = 0.2
    broad = guide.tune_prior_precision(x_val, y_val, grid=grid)
    admissible = [p for p, s in zip(grid, scores) if s <= min(scores) * 1.2]
    assert broad == pytest.approx(min(admissible)) and broad < chosen
    assert broadest_within([3.0, 1.0, 2.0], [0.5, 0.59, 0.7], 0.2) == 1
    assert broadest_within([3.0, 1.0, 2.0], [0.5, 0.59, 0.7], 0.0) == 0


def test_errors_and_flat_subnetwork_warning():
    with pytest.raises(NotPositiveDefiniteError, match="prior precision"):
        cholesky(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    model, x, y = small_regression()
    with pytest.raises(ValueError, match="positive"):
        AutoSubnetLaplace(model, subnet=ps.subnet.All(), prior_precision=-1.0, map_steps=0, progress=False).fit(x, y)
    with pytest.raises(RuntimeError, match="fit"):
        AutoSubnetLaplace(model).predict(x)
    # A hidden unit whose outgoing weight is zero: its input weights do not touch the output.
    net = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1))
    with torch.no_grad():
        net[2].weight[0, 0] = 0.0
    dead = ps.nn.BayesianNet(net, likelihood="regression")
    with pytest.warns(RuntimeWarning, match="nearly zero"):
        AutoSubnetLaplace(dead, subnet=torch.tensor([0, 3]), map_steps=0, progress=False).fit(x, y)
