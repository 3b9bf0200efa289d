"""pyro.infer.Predictive through a Laplace guide draws the linearised (GLM) predictive."""

import arviz as az
import pyro
import pytest
import torch
from torch import nn

import pyro_subnet as ps
from bnn_models import RegressionBNN


def _guide(kind, model, **kw):
    if kind == "subnet":
        return ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.All(), progress=False, **kw)
    return ps.infer.AutoSampledLaplace(model, num_posterior_samples=64, progress=False, **kw)


@pytest.mark.parametrize("kind", ["subnet", "sampled"])
def test_predictive_draws_of_a_linear_gaussian_model_are_the_exact_posterior_predictive(kind):
    data = ps.data.conjugate_regression(n=50, noise=0.5, prior_scale=1.0)
    model = ps.nn.BayesianNet(nn.Linear(2, 1).double(), "regression", prior_scale=1.0, noise_scale=0.5)
    guide = _guide(kind, model, map_steps=0).fit(data.x, data.y, map_theta=data.posterior_mean)
    x_new = torch.randn(30, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    X = torch.cat([x_new, torch.ones(30, 1, dtype=torch.float64)], 1)
    exact_mean, exact_var = X @ data.posterior_mean, (X @ data.posterior_cov * X).sum(-1) + 0.25
    pyro.set_rng_seed(0)
    obs = pyro.infer.Predictive(model, guide=guide, num_samples=4000, parallel=True)(x_new)["obs"]
    # Monte Carlo error of 4000 draws: the mean to ~4 sd / sqrt(4000), the variance to ~10%
    assert ((obs.mean(0) - exact_mean).abs() / exact_var.sqrt()).max() < 0.1
    ratio = obs.var(0) / exact_var
    assert 0.85 < float(ratio.min()) and float(ratio.max()) < 1.15


@pytest.mark.parametrize("kind", ["subnet", "sampled"])
@pytest.mark.parametrize("parallel", [True, False])
def test_predictive_through_a_guide_on_a_nonlinear_net_is_its_glm_predictive(kind, parallel):
    ds = ps.data.gap_regression(n=40)
    torch.manual_seed(0)
    model = RegressionBNN(h=20) if not parallel else ps.nn.BayesianNet(
        nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1)), "regression", noise_scale=None)
    guide = _guide(kind, model, map_steps=600).fit(ds.x_train, ds.y_train)
    mean, var = guide.predict(ds.x_test)
    pyro.set_rng_seed(0)
    obs = pyro.infer.Predictive(model, guide=guide, num_samples=4000 if parallel else 1500, parallel=parallel)(
        ds.x_test)["obs"]
    assert ((obs.mean(0) - mean[:, 0]).abs() / var[:, 0].sqrt()).max() < 0.12
    ratio = obs.var(0) / var[:, 0]
    assert 0.85 < float(ratio.min()) and float(ratio.max()) < 1.15 + 0.05 * (not parallel)
    # the sampled network, an explicit opt-in, is another (much wider in the gap) predictive
    nn_guide = _guide(kind, model, map_steps=0, predictive="nn")
    nn_guide.load_state_dict(guide.state_dict())
    far = pyro.infer.Predictive(model, guide=nn_guide, num_samples=300, parallel=parallel)(ds.x_test)["obs"]
    assert far.shape == obs[:300].shape and not torch.allclose(far.var(0), obs.var(0), rtol=0.3)


@pytest.mark.parametrize("laplace", ["subnet", "diagonal"])
def test_predictive_class_frequencies_are_the_glm_probabilities(laplace):
    ds = ps.data.two_moons(n=100)
    torch.manual_seed(0)
    model = ps.nn.BayesianNet(nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)), "classification")
    if laplace == "subnet":
        guide = ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.All(), prior_precision=1.0, map_steps=500,
                                           progress=False)
    else:
        guide = ps.infer.AutoDiagonalLaplace(model, prior_precision=1.0, map_steps=500, progress=False)
    guide.fit(ds.x_train, ds.y_train)
    probs = guide.predict(ds.x_test, link="mc", num_samples=4000, generator=torch.Generator().manual_seed(0))
    pyro.set_rng_seed(0)
    obs = pyro.infer.Predictive(model, guide=guide, num_samples=4000, parallel=True)(ds.x_test)["obs"]
    freq = torch.stack([(obs == c).double().mean(0) for c in range(2)], -1)
    assert (freq - probs).abs().max() < 0.05


def test_inference_data_and_loo_of_a_laplace_guide_use_the_linearised_model():
    ds = ps.data.gap_regression(n=40)
    torch.manual_seed(0)
    model = RegressionBNN(h=20)
    guide = ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.All(), prior_precision="marglik", map_steps=600,
                                       progress=False).fit(ds.x_train, ds.y_train)
    idata = ps.to_inference_data(guide, ds.x_train, ds.y_train, num_samples=100)
    # the pointwise log-likelihood of a draw is that of the linearised network at the draw
    draw = {n: torch.as_tensor(idata.posterior[n].values[1, 7], dtype=torch.float32) for n in guide.bridge.layout.names}
    theta = guide.bridge.layout.flatten(draw)
    f = guide.linearised_output((theta - guide.loc)[guide.subnet_indices], ds.x_train)[:, 0]
    sigma = float(idata.posterior["sigma"].values[1, 7])
    direct = torch.distributions.Normal(f, sigma).log_prob(ds.y_train)
    assert torch.allclose(torch.as_tensor(idata.log_likelihood["obs"].values[1, 7]).float(), direct, atol=1e-4)
    loo = az.loo(idata)
    assert -2.0 < float(loo.elpd_loo) / len(ds.x_train) < 2.0          # a sane predictive (was ~-5000 per point)
