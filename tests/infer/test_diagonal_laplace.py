"""AutoDiagonalLaplace against closed forms (an orthogonal linear-Gaussian design, where the
diagonal is exact), against a GGN built here with torch.func.jacrev, and its Pyro contracts."""

import math

import pyro
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import pyro_subnet as ps
from pyro_subnet.infer import AutoDiagonalLaplace
from pyro_subnet.infer.autoguide import glm

from bnn_models import ClassifierBNN, RegressionBNN, bayesian_net_twin

NOISE, PRIOR_SCALE = 0.3, 0.7
ALPHA = PRIOR_SCALE ** -2


def linear_problem(orthogonal, n=40, d=3, seed=0):
    """``y = x w + b + noise``; with ``orthogonal`` the design ``[x, 1]`` has orthogonal columns
    of different lengths, so ``X^T X`` (hence the exact posterior precision) is diagonal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if orthogonal:
        q, _ = torch.linalg.qr(x - x.mean(0))            # orthonormal columns, each orthogonal to 1
        x = q * torch.tensor([4.0, 2.0, 0.5], dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64) + 0.2 + NOISE * torch.randn(n, generator=g,
                                                                                             dtype=torch.float64)
    X = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)     # layout: weight (1, d), then bias
    precision = X.T @ X / NOISE ** 2 + ALPHA * torch.eye(d + 1, dtype=torch.float64)
    mean = torch.linalg.solve(precision, X.T @ y / NOISE ** 2)
    return x, y, X, precision, mean


def linear_model(noise=NOISE):
    return ps.nn.BayesianNet(nn.Linear(3, 1), "regression", prior_scale=PRIOR_SCALE, noise_scale=noise)


def test_linear_gaussian_precision_is_the_exact_diagonal_and_the_evidence_the_closed_form():
    # Any design: the diagonal of the exact posterior precision X^T X / sigma^2 + alpha I (the GGN
    # of a linear-Gaussian model is its Hessian); the variances are its reciprocals, not the exact
    # marginals (the diagonal approximation drops the correlations).
    x, y, X, precision, mean = linear_problem(orthogonal=False)
    guide = AutoDiagonalLaplace(linear_model(), map_steps=0, progress=False).fit(x, y, map_theta=mean)
    assert guide.loc.dtype == torch.float64                    # follows the data, not the float32 module
    assert torch.allclose(guide.posterior_precision, torch.diagonal(precision), rtol=1e-10, atol=0)
    assert torch.allclose(guide.prior_prec, torch.full((4,), ALPHA, dtype=torch.float64))
    assert not torch.allclose(guide.posterior_variance, torch.diagonal(torch.linalg.inv(precision)), rtol=1e-2)

    # Orthogonal design: the diagonal is the whole posterior, so the evidence is exact,
    # log N(y; 0, sigma^2 I + X X^T / alpha), and so is the GLM predictive at new inputs.
    x, y, X, precision, mean = linear_problem(orthogonal=True)
    guide = AutoDiagonalLaplace(linear_model(), map_steps=0, progress=False).fit(x, y, map_theta=mean)
    K = NOISE ** 2 * torch.eye(len(y), dtype=torch.float64) + X @ X.T / ALPHA
    exact = torch.distributions.MultivariateNormal(torch.zeros_like(y), K).log_prob(y)
    assert float(guide.log_marginal_likelihood()) == pytest.approx(float(exact), abs=1e-8)
    cov = torch.linalg.inv(precision)
    xs = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    Xs = torch.cat([xs, torch.ones(6, 1, dtype=torch.float64)], 1)
    m, v = guide.predict(xs)
    assert torch.allclose(m[:, 0], Xs @ mean, atol=1e-10)
    assert torch.allclose(v[:, 0], (Xs @ cov * Xs).sum(1) + NOISE ** 2, rtol=1e-10)
    # AnalyticPredictive reads the Gaussian from flat_posterior(): for one linear layer, the same predictive
    post = guide.flat_posterior()
    assert torch.equal(post.mean, guide.loc) and torch.allclose(post.var, 1 / torch.diagonal(precision))
    analytic = ps.infer.AnalyticPredictive(guide.model, post)(xs)
    assert torch.allclose(analytic["mean"].reshape(-1), m[:, 0])
    assert torch.allclose(analytic["var"].reshape(-1), v[:, 0])


def test_prior_tuning_em_equals_marglik_at_the_evidence_maximum():
    x, y, X, precision, mean = linear_problem(orthogonal=True)
    for structure in ("scalar", "layerwise"):
        fits = {m: AutoDiagonalLaplace(linear_model(), prior_precision=m, prior_structure=structure, map_steps=0,
                                       progress=False).fit(x, y, map_theta=mean) for m in ("marglik", "em")}
        a, b = fits["marglik"].prior_prec, fits["em"].prior_prec
        assert torch.allclose(a, b, rtol=1e-4), structure
        p = a.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fits["marglik"].log_marginal_likelihood(p), p)
        per_group = torch.stack([grad.sum()]) if structure == "scalar" else torch.stack([grad[:3].sum(), grad[3]])
        assert per_group.abs().max() < 1e-5                         # stationary in each tuned precision
    assert a[:3].unique().numel() == 1 and a[3] != a[0]          # layerwise: weight and bias apart
    # A learned noise scale is tuned with the prior by both rules, to the same stationary point.
    fits = {m: AutoDiagonalLaplace(linear_model(noise=None), prior_precision=m, map_steps=0,
                                   progress=False) for m in ("marglik", "em")}
    scales = {}
    for m, guide in fits.items():
        guide.fit(x, y, map_theta=mean)
        scales[m] = guide.model.noise_scale
    assert scales["marglik"] == pytest.approx(scales["em"], rel=1e-4)
    assert torch.allclose(fits["marglik"].prior_prec, fits["em"].prior_prec, rtol=1e-3)
    assert abs(scales["em"] - NOISE) < 0.1
    # Given precisions are taken as they are: per layer (site patterns) or per weight.
    pl = AutoDiagonalLaplace(linear_model(), prior_precision={"weight": 3.0, "*": 5.0}, map_steps=0,
                             progress=False).fit(x, y, map_theta=mean)
    assert pl.prior_prec.tolist() == [3.0, 3.0, 3.0, 5.0]


def _flat_net(net, names):
    """The network as a function of one flat weight vector, in ``names`` order (torch.func only)."""
    shapes = {n: p.shape for n, p in net.named_parameters()}

    def f(theta, x):
        params, start = {}, 0
        for n in names:
            size = math.prod(shapes[n])
            params[n] = theta[start:start + size].reshape(shapes[n])
            start += size
        return functional_call(net, params, (x,))
    return f


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_diagonal_ggn_and_glm_predictive_of_a_tanh_net_match_jacrev(likelihood):
    torch.manual_seed(0)
    out = 3 if likelihood == "classification" else 1
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, out)).double()
    model = ps.nn.BayesianNet(net, likelihood, noise_scale=0.2)
    x = torch.randn(30, 2, dtype=torch.float64)
    y = torch.randint(3, (30,)) if likelihood == "classification" else torch.randn(30, dtype=torch.float64)
    guide = AutoDiagonalLaplace(model, prior_precision=2.0, map_steps=0, batch_size=7, progress=False).fit(x, y)
    names = [n for n, _ in net.named_parameters()]
    assert guide.bridge.layout.names == names
    net_f = _flat_net(net, names)
    # the guides linearise the normalised logits, log_softmax(net(x)) (the GGN is the same)
    f = (lambda t, x: torch.log_softmax(net_f(t, x), -1)) if likelihood == "classification" else net_f
    theta = guide.loc
    J = jacrev(f)(theta, x)                                          # (N, O, D)
    logits = f(theta, x)
    if likelihood == "classification":
        p = torch.softmax(logits, -1)
        Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        Lam = torch.eye(1, dtype=torch.float64).expand(30, 1, 1) / 0.2 ** 2
    G = torch.einsum("nod,nop,npe->de", J, Lam, J)                  # the full GGN, J^T Lambda J
    assert torch.allclose(guide.ggn, torch.diagonal(G), rtol=1e-8, atol=1e-10)
    assert torch.allclose(guide.posterior_precision, torch.diagonal(G) + 2.0, rtol=1e-8)
    # GLM predictive at new inputs: f ~ N(f_MAP, J diag(1 / (g + p)) J^T).
    xs = torch.randn(9, 2, dtype=torch.float64)
    Js, fs = jacrev(f)(theta, xs), f(theta, xs)
    F = Js * (1.0 / (torch.diagonal(G) + 2.0)).sqrt()              # (N, O, D): a weight-space factor
    if likelihood == "classification":
        assert torch.allclose(guide.predict(xs), glm.gumbel_max(fs, F), atol=1e-10)
        assert torch.allclose(guide.predict(xs, link="probit"), glm.probit(fs, F), atol=1e-10)
    else:
        m, v = guide.predict(xs)
        assert torch.allclose(m, fs) and torch.allclose(v, F.pow(2).sum(-1) + 0.2 ** 2, rtol=1e-10)


def test_predictive_draws_are_the_glm_predictive():
    ds = ps.data.gap_regression(n=40)
    torch.manual_seed(0)
    model = ps.nn.BayesianNet(nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1)), "regression",
                              noise_scale=None)
    guide = AutoDiagonalLaplace(model, prior_precision="marglik", map_steps=500, progress=False)
    guide.fit(ds.x_train, ds.y_train)
    mean, var = guide.predict(ds.x_test, method="glm")
    pyro.set_rng_seed(0)
    obs = pyro.infer.Predictive(model, guide=guide, num_samples=4000, parallel=True)(ds.x_test)["obs"]
    # Monte Carlo error of 4000 draws: the mean to ~4 sd / sqrt(4000), the variance to ~10%
    assert ((obs.mean(0) - mean[:, 0]).abs() / var[:, 0].sqrt()).max() < 0.1
    ratio = obs.var(0) / var[:, 0]
    assert 0.85 < float(ratio.min()) and float(ratio.max()) < 1.15
    # sequential Predictive draws the same sites, with the noise at its tuned value
    seq = pyro.infer.Predictive(model, guide=guide, num_samples=5)(ds.x_test[:7])
    assert seq["obs"].shape == (5, 7)
    # the sampled network, an explicit opt-in, is another (much wider in the gap) predictive
    nn_guide = AutoDiagonalLaplace(model, map_steps=0, predictive="nn", progress=False)
    nn_guide.load_state_dict(guide.state_dict())
    wide = pyro.infer.Predictive(model, guide=nn_guide, num_samples=300, parallel=True)(ds.x_test)["obs"]
    assert not torch.allclose(wide.var(0), obs.var(0), rtol=0.3)


def test_a_user_pyromodule_is_its_bayesian_net_twin():
    """The user's model (its own per-layer priors, Jacobians by vmap/jacrev) and the same network as
    a BayesianNet (the nn.Linear fast path) give the same curvature, prior, evidence and predictive."""
    ds = ps.data.two_moons(n=80)
    torch.manual_seed(0)
    user = ClassifierBNN(2, 8, 2)
    twin = bayesian_net_twin(user, "classification")
    theta = ps.infer.fit_map(user, ds.x_train, ds.y_train, num_steps=300, lr=1e-2, progress=False).theta
    guides = {}
    for name, model in (("user", user), ("twin", twin)):
        guides[name] = AutoDiagonalLaplace(model, prior_precision="marglik", prior_structure="layerwise",
                                           progress=False).fit(ds.x_train, ds.y_train, map_theta=theta)
    u, t = guides["user"], guides["twin"]
    assert torch.allclose(u.ggn, t.ggn, rtol=1e-4, atol=1e-6)
    assert torch.allclose(u.prior_prec, t.prior_prec, rtol=1e-3)
    assert float(u.log_marginal_likelihood()) == pytest.approx(float(t.log_marginal_likelihood()), rel=1e-4)
    assert torch.allclose(u.predict(ds.x_test), t.predict(ds.x_test), atol=1e-5)
    # None = the model's own prior: N(0, 1) except fc2.weight, N(0, 1/h)
    own = AutoDiagonalLaplace(user, progress=False).fit(ds.x_train, ds.y_train, map_theta=theta)
    sizes = {n: s.numel() for n, s in own.bridge.layout.shapes.items()}
    expected = torch.cat([torch.full((sizes[n],), 8.0 if n == "fc2.weight" else 1.0) for n in own.bridge.layout.names])
    assert torch.allclose(own.prior_prec, expected)


def test_a_latent_noise_site_is_tuned_by_the_evidence_and_drawn_at_its_value():
    ds = ps.data.gap_regression(n=40)
    torch.manual_seed(0)
    model = RegressionBNN(h=10)                                      # sigma ~ HalfNormal(1), a latent site
    guide = AutoDiagonalLaplace(model, prior_precision="em", map_steps=400, progress=False)
    guide.fit(ds.x_train, ds.y_train)
    sigma = guide.bridge.likelihood.noise_scale
    assert 0.03 < sigma < 0.5
    assert float(guide.median()["sigma"]) == pytest.approx(sigma)
    draws = pyro.infer.Predictive(model, guide=guide, num_samples=20)(ds.x_test)   # (not vectorisable)
    assert draws["obs"].shape == (20, len(ds.x_test))
    assert torch.allclose(draws["sigma"], torch.full_like(draws["sigma"], sigma))
    mean, var = guide.predict(ds.x_test)
    assert float(var.min()) > sigma ** 2                            # function variance plus the noise


def test_validation_picks_the_grid_value_with_the_lowest_held_out_nll():
    ds = ps.data.two_moons(n=120)
    x, y = ds.x_train[:60], ds.y_train[:60]
    x_val, y_val = ds.x_train[60:], ds.y_train[60:]
    torch.manual_seed(0)
    model = ps.nn.BayesianNet(nn.Sequential(nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 2)), "classification")
    theta = ps.infer.fit_map(model, x, y, num_steps=300, lr=1e-2, progress=False).theta
    grid = [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
    nll = [ps.metrics.nll(AutoDiagonalLaplace(model, prior_precision=p, progress=False).fit(
        x, y, map_theta=theta).predict(x_val), y_val) for p in grid]
    guide = AutoDiagonalLaplace(model, prior_precision="validation", validation_grid=grid, progress=False)
    guide.fit(x, y, map_theta=theta, validation=(x_val, y_val))
    assert float(guide.prior_prec[0]) == grid[min(range(len(grid)), key=nll.__getitem__)]
    assert len(set(nll)) == len(grid)                                # the grid values are told apart
    assert guide.tune_prior_precision(x_val, y_val, grid=grid) == float(guide.prior_prec[0])


def test_errors_on_bad_input():
    x, y, X, precision, mean = linear_problem(orthogonal=False)
    model = linear_model()
    with pytest.raises(ValueError, match="a string must be one of"):
        AutoDiagonalLaplace(model, prior_precision="evidense")
    with pytest.raises(ValueError, match="positive"):
        AutoDiagonalLaplace(model, prior_precision=-1.0)
    with pytest.raises(ValueError, match="prior_structure"):
        AutoDiagonalLaplace(model, prior_structure="kron")
    with pytest.raises(ValueError, match="validation_grid"):
        AutoDiagonalLaplace(model, validation_grid=[1.0, 0.0])
    with pytest.raises(RuntimeError, match="fit"):
        AutoDiagonalLaplace(model).predict(x)
    with pytest.raises(ValueError, match="validation="):
        AutoDiagonalLaplace(model, prior_precision="validation", map_steps=0).fit(x, y)
    with pytest.raises(ValueError, match=r"shape \(\) or \(k,\)"):
        AutoDiagonalLaplace(model, prior_precision=torch.ones(3), map_steps=0, progress=False).fit(x, y)
    guide = AutoDiagonalLaplace(model, map_steps=0, progress=False).fit(x, y, map_theta=mean)
    with pytest.raises(ValueError, match="method"):
        guide.predict(x, method="kfac")


def test_noise_map_keeps_the_map_noise_and_its_curvature():
    """noise='map': a learned noise stays at the MAP's value (the likelihood's, with map_theta)
    and the diagonal GGN is taken at it, g = sum_n J_n^2 / sigma^2; 'evidence' moves it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -1.0], dtype=torch.float64) + 0.3 * torch.randn(30, generator=g, dtype=torch.float64)
    fits = {}
    for rule in ("map", "evidence"):
        model = ps.nn.BayesianNet(nn.Linear(2, 1).double(), "regression", noise_scale=None)
        model.likelihood.set_noise_scale(0.25)
        theta = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
        fits[rule] = AutoDiagonalLaplace(model, progress=False, noise=rule).fit(x, y, map_theta=theta)
    assert float(fits["map"].noise_scale) == pytest.approx(0.25)
    assert abs(float(fits["evidence"].noise_scale) - 0.25) > 0.01
    design = torch.cat([x, torch.ones(30, 1, dtype=torch.float64)], 1)      # weight, bias
    torch.testing.assert_close(fits["map"].ggn, (design ** 2).sum(0) / 0.25 ** 2)
    with pytest.raises(ValueError, match="noise="):
        AutoDiagonalLaplace(RegressionBNN(), noise="mle")
