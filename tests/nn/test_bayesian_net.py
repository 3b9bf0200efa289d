import warnings

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS, Predictive
from pyro.nn import PyroModule, PyroSample
from torch import nn

from pyro_subnet.nn import BayesianNet, FunctionalNet, ModelBridge


def _classifier():
    return BayesianNet(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)), "classification")


def test_sites_named_after_parameters():
    model = _classifier()
    x, y = torch.randn(10, 2), torch.randint(0, 3, (10,))
    tr = pyro.poutine.trace(model).get_trace(x, y)
    latent = [n for n, s in tr.nodes.items()
              if s["type"] == "sample" and not s["is_observed"] and n != "data"]
    assert latent == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert tr.nodes["obs"]["is_observed"] and tr.nodes["obs"]["fn"].batch_shape == (10,)
    assert tr.nodes["0.weight"]["fn"].event_shape == (8, 2)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_parallel_predictive_equals_sequential(likelihood):
    out = 3 if likelihood == "classification" else 1
    model = BayesianNet(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, out)), likelihood)
    x = torch.randn(15, 2)
    draws = Predictive(model, num_samples=6)(x)
    draws = {k: v for k, v in draws.items() if k != "obs"}
    seq = Predictive(model, posterior_samples=draws, return_sites=["_RETURN", "obs"], parallel=False)(x)
    par = Predictive(model, posterior_samples=draws, return_sites=["_RETURN", "obs"], parallel=True)(x)
    assert par["_RETURN"].shape == (6, 15, out)
    assert torch.allclose(seq["_RETURN"], par["_RETURN"], atol=1e-6, rtol=0)
    # and both equal a direct evaluation of the network at each draw
    direct = torch.stack([model.network({k: v[s, 0] for k, v in draws.items()}, x) for s in range(6)])
    assert torch.allclose(direct, par["_RETURN"], atol=1e-6, rtol=0)
    assert par["obs"].shape == (6, 15)


def test_subsampling_scales_the_likelihood():
    model = BayesianNet(nn.Linear(2, 1), "regression", noise_scale=1.0, subsample_size=5)
    x, y = torch.randn(20, 2), torch.randn(20)
    tr = pyro.poutine.trace(model).get_trace(x, y)
    tr.compute_log_prob()
    obs = tr.nodes["obs"]
    assert obs["value"].shape == (5,)
    assert obs["scale"] == pytest.approx(4.0)


def test_nuts_then_arviz_has_log_likelihood_and_loo():
    torch.manual_seed(0)
    model = BayesianNet(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)), "classification")
    x = torch.randn(20, 2)
    y = (x[:, 0] > 0).long()
    mcmc = MCMC(NUTS(model), num_samples=20, warmup_steps=20, num_chains=1, disable_progbar=True)
    mcmc.run(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # from_pyro warns when it drops log_likelihood
        idata = az.from_pyro(mcmc)
    assert "log_likelihood" in idata.groups()
    assert idata.log_likelihood["obs"].shape == (1, 20, 20)
    loo = az.loo(idata)
    assert torch.isfinite(torch.tensor(loo.elpd_loo))


def test_log_likelihood_and_prior_match_the_trace():
    model = _classifier()
    x, y = torch.randn(10, 2), torch.randint(0, 3, (10,))
    tr = pyro.poutine.trace(model).get_trace(x, y)
    tr.compute_log_prob()
    theta = model.layout.flatten({n: tr.nodes[n]["value"] for n in model.layout.names})
    bridge = ModelBridge(model, x)
    assert torch.allclose(bridge.log_likelihood(theta, x, y), tr.nodes["obs"]["log_prob"], atol=1e-6)
    prior = sum(tr.nodes[n]["log_prob_sum"] for n in model.layout.names)
    assert torch.allclose(bridge.log_prior(theta), prior, atol=1e-5)


def test_prior_scale_patterns_and_custom_prior():
    model = BayesianNet(nn.Linear(2, 2), prior_scale={"*bias": 10.0, "*": 0.5})
    prec = model.prior_precision()
    assert torch.allclose(prec[:4], torch.full((4,), 4.0)) and torch.allclose(prec[4:], torch.full((2,), 0.01))
    laplace = BayesianNet(nn.Linear(2, 2), prior=dist.Laplace(0.0, 1.0))
    tr = pyro.poutine.trace(laplace).get_trace(torch.randn(3, 2))
    assert isinstance(tr.nodes["weight"]["fn"].base_dist, dist.Laplace)


def test_bad_input_raises_value_error_naming_the_problem():
    with pytest.raises(ValueError, match="no parameters"):
        BayesianNet(nn.Tanh())
    model = _classifier()
    x = torch.randn(10, 2)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(x, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="mismatched shapes"):
        model(torch.randn(10, 2), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        model(torch.randn(4, 2), torch.tensor([0.5, 1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="likelihood"):
        BayesianNet(nn.Linear(2, 2), likelihood="poisson")


def test_pyromodule_without_pyrosample_is_rejected():
    net = PyroModule[nn.Linear](2, 2)
    with pytest.raises(ValueError, match="no PyroSample"):
        FunctionalNet(net, example_input=torch.randn(3, 2))


def test_functional_view_of_a_user_pyromodule():
    net = PyroModule[nn.Sequential](PyroModule[nn.Linear](2, 4), nn.Tanh(), PyroModule[nn.Linear](4, 1))
    for lin in (net[0], net[2]):
        lin.weight = PyroSample(dist.Normal(0.0, 1.0).expand(lin.weight.shape).to_event(2))
        lin.bias = PyroSample(dist.Normal(0.0, 1.0).expand(lin.bias.shape).to_event(1))
    x = torch.randn(7, 2)
    fnet = FunctionalNet(net, example_input=x)
    assert fnet.layout.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    theta = torch.randn(5, fnet.layout.dim)
    out = fnet.flat_batched(theta, x)
    params = fnet.layout.unflatten(theta[2])
    expected = torch.tanh(x @ params["0.weight"].T + params["0.bias"]) @ params["2.weight"].T + params["2.bias"]
    assert torch.allclose(out[2], expected, atol=1e-6)
    # the user's module still samples its weights afterwards
    tr = pyro.poutine.trace(net).get_trace(x)
    assert "0.weight" in tr.nodes


def test_float64_data_gives_float64_sites():
    model = _classifier()
    x = torch.randn(5, 2, dtype=torch.float64)
    tr = pyro.poutine.trace(model).get_trace(x)
    assert tr.nodes["0.weight"]["value"].dtype == torch.float64
    assert tr.nodes["_RETURN"]["value"].dtype == torch.float64


def test_learned_noise_starts_at_one_and_the_model_reads_the_value_set():
    model = BayesianNet(nn.Linear(1, 1), "regression", noise_scale=None)
    assert model.likelihood.learn_noise and model.noise_scale == 1.0
    model.likelihood.set_noise_scale(0.25)
    tr = pyro.poutine.trace(model).get_trace(torch.randn(3, 1), torch.randn(3))
    assert torch.all(tr.nodes["obs"]["fn"].scale == 0.25)
    with pytest.raises(ValueError, match="positive"):
        model.likelihood.set_noise_scale(-1.0)


def test_closed_form_normal_prior_equals_the_site_distributions():
    model = BayesianNet(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), "classification",
                        prior_scale={"*bias": 3.0, "*": 0.7})
    theta = torch.randn(5, model.layout.dim, dtype=torch.float64)
    values = model.layout.unflatten(theta)
    direct = sum(model.site_prior(n, theta).log_prob(v) for n, v in values.items())
    bridge = ModelBridge(model, torch.randn(2, 3))
    assert bridge._normal_terms(theta) is not None          # the closed form was taken
    assert torch.allclose(bridge.log_prior(theta), direct)


def test_fused_log_prob_sums_equal_the_distributions():
    f = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    lik = _classifier().likelihood
    assert torch.allclose(lik.log_prob_sum(f, y), lik.log_prob(f, y).sum())
    reg = BayesianNet(nn.Linear(2, 1), "regression", noise_scale=0.3).likelihood
    f1, y1 = torch.randn(6, 1, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    assert torch.allclose(reg.log_prob_sum(f1, y1), reg.log_prob(f1, y1).sum())


def test_default_prior_is_built_once_and_follows_set_prior_scale():
    model = BayesianNet(nn.Linear(3, 2), likelihood="classification", prior_scale=1.0)
    x = torch.randn(4, 3)
    first, again = (pyro.poutine.trace(model).get_trace(x).nodes["weight"]["fn"] for _ in range(2))
    assert first is again                          # one distribution per site, dtype and device
    model.set_prior_scale(0.25)
    fn = pyro.poutine.trace(model).get_trace(x).nodes["weight"]["fn"]
    assert torch.allclose(fn.base_dist.scale, torch.tensor(0.25))
    fn64 = pyro.poutine.trace(model.double()).get_trace(x.double()).nodes["weight"]["fn"]
    assert fn64.base_dist.scale.dtype == torch.float64
