"""SGHMC right by default on networks: the failures a hand-picked step size used to hide."""

import pyro
import pytest
import torch
from bnn_models import RegressionBNN
from pyro.infer import MCMC

import pyro_subnet as ps
from pyro_subnet.infer import SGHMC
from pyro_subnet.infer.map import fit_map


def _data(n=40):
    ds = ps.data.gap_regression(n=n, noise=0.1, seed=0, dtype=torch.float32)
    return ds.x_train, ds.y_train


def test_tanh_network_default_step_size_samples_and_a_fixed_large_one_warns():
    """A 1-20-1 tanh regression, 40 points. step_size=1e-3 fixed diverges: every divergent move
    is undone (the chain stays finite) and the run says so. No step size: warm-up finds one,
    nothing diverges, the draws move and fit the data."""
    torch.set_num_threads(1)
    x, y = _data()
    pyro.set_rng_seed(0)
    kernel = SGHMC(RegressionBNN(h=20, sigma=0.1), step_size=1e-3, adapt_step_size=False)
    mcmc = MCMC(kernel, num_samples=100, warmup_steps=50, disable_progbar=True)
    with pytest.warns(RuntimeWarning, match="divergent step"):
        mcmc.run(x, y)
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for v in mcmc.get_samples().values())

    pyro.set_rng_seed(0)
    model = RegressionBNN(h=20, sigma=0.1)
    kernel = SGHMC(model, steps_per_sample=10)
    mcmc = MCMC(kernel, num_samples=100, warmup_steps=600, disable_progbar=True)
    mcmc.run(x, y)
    assert mcmc.diagnostics()["divergences"]["chain 0"] == []
    samples = mcmc.get_samples()
    assert samples["fc1.weight"].std(0).min() > 1e-3          # the draws move
    mu = pyro.infer.Predictive(model, samples, return_sites=["_RETURN"])(x)["_RETURN"]
    rmse = float((mu.mean(0) - y).pow(2).mean().sqrt())
    assert rmse < 0.2, rmse                                   # noise 0.1: the average draw fits


def test_vb_preconditioner_with_a_latent_noise_scale():
    """preconditioner='vb' on a model with sigma ~ HalfNormal(1): sigma stays positive, finite
    and near the MAP's (this small tanh network leaves a residual scale of about 0.3 on the gap
    data), with a finite log density at every draw."""
    torch.set_num_threads(1)
    x, y = _data(100)
    pyro.set_rng_seed(0)
    kernel = SGHMC(RegressionBNN(h=20), preconditioner="vb", subsample_size=25, steps_per_sample=10)
    mcmc = MCMC(kernel, num_samples=100, warmup_steps=600, disable_progbar=True)
    mcmc.run(x, y)
    sigma = mcmc.get_samples()["sigma"]
    assert (sigma > 0).all() and torch.isfinite(sigma).all()
    pyro.set_rng_seed(0)
    map_sigma = fit_map(RegressionBNN(h=20), x, y, num_steps=1500, progress=False).noise_scale
    assert abs(float(sigma.mean()) / map_sigma - 1) < 0.2, (float(sigma.mean()), map_sigma)
    lp = torch.tensor(mcmc.diagnostics()["lp"]["chain 0"])
    assert torch.isfinite(lp).all()
