"""AnalyticPredictive on an AutoNormal BayesianNet classifier trained by SVI, against Monte Carlo."""

import pyro
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

import pyro_subnet as ps


def test_autonormal_classifier_matches_monte_carlo():
    ds = ps.data.two_moons(n=1000)
    x, y = ds.x_train, ds.y_train
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))
    model = ps.nn.BayesianNet(net, likelihood="classification", prior_scale=1.0)
    guide = AutoNormal(model, init_scale=0.05)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(400):
        svi.step(x, y)
    xt, yt = ds.x_test, ds.y_test
    probs = ps.infer.AnalyticPredictive(model, guide)(xt)["probs"]
    assert torch.allclose(probs.sum(-1), torch.ones(len(xt)), atol=1e-6)
    f = Predictive(model, guide=guide, num_samples=1000, parallel=True, return_sites=["_RETURN"])(xt)["_RETURN"]
    mc = torch.softmax(f, -1).mean(0)
    nll_a, nll_mc = ps.metrics.nll(probs, yt), ps.metrics.nll(mc, yt)
    assert abs(nll_a / nll_mc - 1) < 0.05
    assert (probs - mc).abs().mean() < 0.03
