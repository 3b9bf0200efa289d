"""The model bridge: any Pyro model written in the style of Pyro's tutorials, read as every method
needs it, with the model's own priors; and equal to the same network built with BayesianNet."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

import pyro_subnet as ps
from pyro_subnet.nn import ModelBridge

from bnn_models import ClassifierBNN, RegressionBNN, bayesian_net_twin    # (tests/ is on the path: its conftest)


def test_the_bridge_reads_a_tutorial_model():
    x = torch.randn(12, 1)
    bridge = ModelBridge(RegressionBNN(), x)
    assert bridge.layout.names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert bridge.layout.dim == 10 + 10 + 10 + 1
    assert bridge.noise_site == "sigma" and bridge.likelihood.name == "regression" and bridge.likelihood.learn_noise
    assert bridge.network.flat(bridge.initial_theta(), x).shape == (12, 1)
    assert bridge.network.flat_batched(bridge.initial_theta().expand(3, -1), x).shape == (3, 12, 1)
    fixed = ModelBridge(RegressionBNN(sigma=0.3), x)
    assert fixed.noise_site is None and fixed.likelihood.noise_scale == pytest.approx(0.3)
    assert not fixed.likelihood.learn_noise
    cls = ModelBridge(ClassifierBNN(2, 5, 3), torch.randn(7, 2))
    assert cls.likelihood.name == "classification" and cls.network.flat(cls.initial_theta(), torch.randn(7, 2)).shape == (7, 3)
    # the per-layer prior is the model's own: precision h on fc2.weight, 1 elsewhere
    prec = ModelBridge(RegressionBNN(h=10), x).prior_precision()
    assert torch.allclose(prec[20:30], torch.full((10,), 10.0)) and torch.allclose(prec[:20], torch.ones(20))
    # reading the model leaves the user's random stream alone
    model = RegressionBNN()
    state = torch.get_rng_state()
    ModelBridge(model, x)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("prior", [dist.Normal, dist.Laplace, lambda loc, scale: dist.StudentT(3.0, loc, scale)])
def test_the_log_prior_is_the_models_own(prior):
    torch.set_default_dtype(torch.float64)
    try:
        model = RegressionBNN(h=6, prior=prior)
        x = torch.randn(9, 1)
        bridge = ModelBridge(model, x)
        theta = torch.randn(4, bridge.layout.dim)
        for draw in theta:
            values = bridge.layout.unflatten(draw)
            trace = pyro.poutine.trace(pyro.poutine.condition(model, {**values, "sigma": torch.tensor(0.5)})).get_trace(x)
            trace.compute_log_prob()
            expected = sum(trace.nodes[n]["log_prob_sum"] for n in bridge.layout.names)
            assert float(bridge.log_prior(draw)) == pytest.approx(float(expected), abs=1e-6, rel=0)
        assert bridge.log_prior(theta).shape == (4,)              # and batched over draws
        assert torch.allclose(bridge.log_prior(theta), torch.stack([bridge.log_prior(t) for t in theta]))
        assert bridge._static and (bridge._normal_terms(theta) is not None) == (prior is dist.Normal)
        sigma_prior = dist.HalfNormal(1.0).log_prob(torch.tensor(0.5))
        assert float(bridge.noise_log_prior(torch.tensor(0.5).log())) == pytest.approx(float(sigma_prior) + math.log(0.5))
    finally:
        torch.set_default_dtype(torch.float32)


def test_a_hierarchical_prior_is_evaluated_through_the_model():
    class Hierarchical(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc = PyroModule[nn.Linear](2, 1)
            self.fc.weight = PyroSample(lambda m: dist.Normal(0.0, self.tau).expand([1, 2]).to_event(2))
            self.fc.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

        @PyroSample
        def tau(self):
            return dist.LogNormal(0.0, 1.0)

        def forward(self, x, y=None):
            mu = self.fc(x).squeeze(-1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(mu, 0.1), obs=y)

    model, x = Hierarchical(), torch.randn(5, 2)
    bridge = ModelBridge(model, x)
    assert not bridge._static and set(bridge.layout.names) == {"tau", "fc.weight", "fc.bias"}
    # lazy_priors: decided on first use, from a second draw that is the same whenever it is made, even
    # where the user reseeds before each bridge; the user's random stream is left alone throughout
    torch.manual_seed(3)
    lazy = ModelBridge(model, x, lazy_priors=True)
    state = torch.get_rng_state()
    assert lazy._static_value is None and not lazy._static and torch.equal(state, torch.get_rng_state())
    # a classifier needs no second draw to be read: one model run, the second on first use
    classifier, runs = ClassifierBNN(2, 5, 3), []
    classifier.register_forward_pre_hook(lambda m, a: runs.append(1))
    lazy = ModelBridge(classifier, torch.randn(7, 2), lazy_priors=True)
    assert len(runs) == 1 and lazy._static and len(runs) == 2
    assert ModelBridge(classifier, torch.randn(7, 2))._static_value and len(runs) == 4
    theta = torch.randn(3, bridge.layout.dim)
    for draw in theta:
        values = bridge.constrained(bridge.layout.unflatten(draw))
        trace = pyro.poutine.trace(pyro.poutine.condition(model, values)).get_trace(x)
        trace.compute_log_prob()
        tau_u = bridge.layout.unflatten(draw)["tau"]
        expected = sum(trace.nodes[n]["log_prob_sum"] for n in values) + tau_u   # + log|d tau / d log tau|
        assert float(bridge.log_prior(draw)) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_a_user_pyromodule_and_its_bayesian_net_twin_give_the_same_posterior(likelihood):
    """Same architecture, priors and weights: the same GGN, evidence and GLM predictive (1e-6),
    the same AnalyticPredictive, and the same SMC draws for the same seed."""
    torch.manual_seed(0)
    if likelihood == "regression":
        ds = ps.data.gap_regression(n=60)
        user = RegressionBNN(h=12, sigma=0.1)
    else:
        ds = ps.data.load_wine()
        user = ClassifierBNN(13, 8, 3)
    twin = bayesian_net_twin(user, likelihood)
    x, y = ds.x_train, ds.y_train
    theta = ps.infer.fit_map(twin, x, y, num_steps=300, progress=False).theta
    guides = [ps.infer.AutoSubnetLaplace(m, subnet=ps.subnet.All(), progress=False).fit(x, y, map_theta=theta)
              for m in (user, twin)]
    a, b = guides
    assert type(a.bridge.network).__name__ == "ModelNetwork" and type(b.bridge.network).__name__ == "NetworkOutput"
    assert torch.allclose(a.ggn, b.ggn, atol=1e-6 * float(b.ggn.abs().max()), rtol=0)
    assert float(a.log_marginal_likelihood()) == pytest.approx(float(b.log_marginal_likelihood()), abs=1e-4)
    pa, pb = a.predict(ds.x_test), b.predict(ds.x_test)
    for u, v in (zip(pa, pb) if likelihood == "regression" else [(pa, pb)]):
        assert torch.allclose(u, v, atol=1e-6, rtol=0)
    posterior = ps.infer.analytic.FlatPosterior(theta, torch.full_like(theta, 0.01))
    qa, qb = (ps.infer.AnalyticPredictive(m, posterior)(ds.x_test) for m in (user, twin))
    assert torch.allclose(qa["f_mean"], qb["f_mean"], atol=1e-5) and torch.allclose(qa["f_var"], qb["f_var"], atol=1e-5)
    draws = []
    for m in (user, twin):
        # A fixed number of MALA moves on the population's spread: an adaptive count could differ by
        # one round on a rounding difference, and HMC's ten leapfrog steps (the default move) carry a
        # rounding difference far enough to flip an accept decision, after which the runs part.
        smc = ps.infer.AnnealedSMC(m, num_particles=32, batch_size=20, seed=3, progress=False, max_mcmc_steps=5,
                                   move="mala", covariance="diagonal")
        smc.run(x, y)
        draws.append(smc.particles())
    assert torch.allclose(draws[0], draws[1], atol=1e-3)


def test_a_bayesian_net_of_a_pyromodule_network_uses_its_priors():
    net = PyroModule[nn.Sequential](PyroModule[nn.Linear](2, 4), nn.Tanh(), PyroModule[nn.Linear](4, 3))
    for lin in (net[0], net[2]):
        lin.weight = PyroSample(dist.Laplace(0.0, 0.5).expand(lin.weight.shape).to_event(2))
        lin.bias = PyroSample(dist.Normal(0.0, 1.0).expand(lin.bias.shape).to_event(1))
    model = ps.nn.BayesianNet(net, "classification")
    x = torch.randn(30, 2)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    guide = ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.All(), map_steps=300, progress=False).fit(x, y)
    assert model.layout.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert torch.allclose(guide.bridge.prior_precision()[:8], torch.full((8,), 2.0))   # 1 / Var = 1 / (2 b^2)
    assert ps.metrics.accuracy(guide.predict(x), y) > 0.8
    assert pyro.infer.Predictive(model, guide=guide, num_samples=3, parallel=True)(x)["obs"].shape == (3, 30)
    with pytest.raises(ValueError, match="PyroSample priors of its own"):
        ps.nn.BayesianNet(net, "classification", prior_scale=2.0)


def test_models_the_bridge_cannot_read_get_clear_errors():
    class TwoObserved(PyroModule):
        def forward(self, x, y=None):
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("a", dist.Normal(w * x[:, 0], 1.0))
                pyro.sample("b", dist.Normal(w * x[:, 0], 1.0))

    with pytest.raises(ps.nn.bridge.UnsupportedModelError, match=r"one observed site inside pyro.plate\('data', N\)"):
        ModelBridge(TwoObserved(), torch.randn(4, 1))

    class Poisson(PyroModule):
        def forward(self, x, y=None):
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Poisson((w * x[:, 0]).exp()), obs=y)

    with pytest.raises(ps.nn.bridge.UnsupportedModelError, match="Poisson"):
        ModelBridge(Poisson(), torch.randn(4, 1))
    with pytest.raises(TypeError, match="plain torch module, not a Pyro model.*BayesianNet"):
        ps.infer.AutoSubnetLaplace(nn.Linear(2, 1))


def test_the_analytic_predictive_walks_a_traced_forward_or_names_what_it_cannot():
    torch.manual_seed(0)
    model, x = RegressionBNN(h=6, sigma=0.2), torch.randn(10, 1)
    bridge = ModelBridge(model, x)
    theta = bridge.initial_theta()
    post = ps.infer.analytic.FlatPosterior(theta, torch.zeros_like(theta))       # a point: the exact network
    out = ps.infer.AnalyticPredictive(model, post)(x)
    assert torch.allclose(out["mean"], bridge.network.flat(theta, x)[:, 0], atol=1e-6)
    assert torch.allclose(out["var"], torch.full((10,), 0.04), atol=1e-6)           # the noise alone

    class Residual(RegressionBNN):
        def forward(self, x, y=None):
            h = torch.tanh(self.fc1(x))
            mu = (self.fc2(h) + x).squeeze(-1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(mu, 0.2), obs=y)

    with pytest.raises(NotImplementedError, match=r"uses Tensor.add on values computed from x.*branch, residual sum"):
        ps.infer.AnalyticPredictive(Residual(h=6), post)(x)

    class Cumulative(RegressionBNN):
        def forward(self, x, y=None):
            mu = torch.cumsum(self.fc2(torch.tanh(self.fc1(x))), 0).squeeze(-1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Normal(mu, 0.2), obs=y)

    with pytest.raises(NotImplementedError, match=r"applies torch.cumsum to values computed from x.*torch.tanh"):
        ps.infer.AnalyticPredictive(Cumulative(h=6), post)(x)
