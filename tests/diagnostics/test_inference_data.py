import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from torch import nn

import pyro_subnet as ps
from pyro_subnet.diagnostics.arviz_io import group_names


class PlainLinearNet(PyroModule):
    """The kind of model Pyro's tutorials write: not batch-aware (F.linear rejects 3-D weights)."""

    def __init__(self):
        super().__init__()
        self.fc = PyroModule[nn.Linear](2, 3)
        self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([3, 2]).to_event(2))
        self.fc.bias = PyroSample(dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    def forward(self, x, y=None):
        logits = self.fc(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def _data(n=24):
    torch.manual_seed(0)
    x = torch.randn(n, 2)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return x, y


def _models():
    return {"batch_aware": ps.nn.BayesianNet(nn.Linear(2, 3), "classification"),
            "pyromodule": PlainLinearNet()}


@pytest.mark.parametrize("kind", ["batch_aware", "pyromodule"])
def test_nuts_to_inference_data_has_every_group_and_passes_arviz(kind):
    x, y = _data()
    model = _models()[kind]
    mcmc = MCMC(NUTS(model), num_samples=15, warmup_steps=15, num_chains=2, disable_progbar=True,
                mp_context=None)
    mcmc.run(x, y)
    idata = ps.to_inference_data(mcmc)
    assert {"posterior", "sample_stats", "log_likelihood", "posterior_predictive",
            "observed_data"} <= set(group_names(idata))
    assert idata.log_likelihood["obs"].shape == (2, 15, 24)
    # the pointwise log-likelihood equals a direct evaluation at one draw
    # (ArviZ holds float64: the draws were float32, so casting back is exact)
    w = torch.as_tensor(idata.posterior["fc.weight" if kind == "pyromodule" else "weight"].values[1, 3], dtype=x.dtype)
    b = torch.as_tensor(idata.posterior["fc.bias" if kind == "pyromodule" else "bias"].values[1, 3], dtype=x.dtype)
    direct = dist.Categorical(logits=x @ w.T + b).log_prob(y).numpy()
    np.testing.assert_allclose(idata.log_likelihood["obs"].values[1, 3], direct, atol=1e-5)
    assert np.array_equal(idata.observed_data["obs"].values, y.numpy())
    summary = az.summary(idata)
    assert np.isfinite(summary["r_hat"]).all() and np.isfinite(az.ess(idata).to_array()).all()
    assert np.isfinite(az.rhat(idata).to_array()).all()
    assert np.isfinite(az.loo(idata).elpd_loo)


def test_guide_to_inference_data_on_a_minibatched_model_uses_all_data():
    x, y = _data(40)
    model = ps.nn.BayesianNet(nn.Linear(2, 3), "classification", subsample_size=8)
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(100):
        svi.step(x, y)
    idata = ps.to_inference_data(guide, x, y, num_samples=50, num_chains=1)
    assert idata.posterior["weight"].shape == (1, 50, 3, 2)
    assert idata.log_likelihood["obs"].shape == (1, 50, 40)     # all 40, not a mini-batch of 8
    assert idata.observed_data["obs"].shape == (40,)
    assert np.isfinite(az.loo(idata).elpd_loo)
    assert np.isfinite(idata.sample_stats["lp"].values).all()
