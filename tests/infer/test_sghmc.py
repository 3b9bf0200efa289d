"""SGHMC against the closed-form posterior of conjugate Bayesian linear regression, and its
contracts with pyro.infer.MCMC and ArviZ."""

import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC
from torch import nn

from pyro_subnet.infer import SGHMC
import pyro_subnet as ps
from pyro_subnet.infer.mcmc import CyclicalCosine, PolynomialDecay
from pyro_subnet.nn import BayesianNet

N, D, SIGMA = 100, 3, 1.0


def _problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    y = x @ torch.tensor([1.0, -0.5, 0.3], dtype=dtype) + SIGMA * torch.randn(N, generator=g, dtype=dtype)
    # Exact posterior of w ~ N(0, I), y | x, w ~ N(x w, SIGMA^2): precision A, mean A^{-1} x^T y / SIGMA^2.
    A = x.T @ x / SIGMA ** 2 + torch.eye(D, dtype=dtype)
    cov = torch.linalg.inv(A)
    return x, y, cov @ x.T @ y / SIGMA ** 2, cov


def _model(dtype=torch.float64, **kw):
    net = nn.Linear(D, 1, bias=False).to(dtype)
    return BayesianNet(net, likelihood="regression", noise_scale=SIGMA, prior_scale=1.0, **kw)


# Defaults: no step size (warm-up adapts it), friction 0.1; full batch and N/B = 4.
@pytest.mark.parametrize("preconditioner, subsample_size", [(None, None), (None, 25), ("rmsprop", 25)])
def test_conjugate_linear_regression_matches_exact_posterior(preconditioner, subsample_size):
    torch.set_num_threads(1)   # tiny tensors: threads only add latency
    x, y, mean, cov = _problem()
    pyro.set_rng_seed(0)
    kernel = SGHMC(_model(), preconditioner=preconditioner, subsample_size=subsample_size, steps_per_sample=10)
    mcmc = MCMC(kernel, num_samples=1000, warmup_steps=200, num_chains=2, disable_progbar=True)
    mcmc.run(x, y)
    w = mcmc.get_samples(group_by_chain=True)["weight"].reshape(2, -1, D)
    flat = w.reshape(-1, D)
    sd = cov.diag().sqrt()
    assert ((flat.mean(0) - mean).abs() / sd).max() < 0.1
    ratio = flat.var(0) / cov.diag()
    assert ((ratio - 1).abs() < 0.2).all(), ratio
    rhat = az.rhat(az.convert_to_dataset(w.numpy()))["x"].values
    assert (rhat < 1.05).all(), rhat
    assert all(d == [] for d in mcmc.diagnostics()["divergences"].values())


def test_arviz_from_pyro_two_chains_full_data_log_likelihood():
    torch.set_num_threads(1)
    x, y, mean, cov = _problem(torch.float32)
    kernel = SGHMC(_model(torch.float32, subsample_size=20), friction=0.5, steps_per_sample=10)
    init = {"weight": mean.float().reshape(1, 1, D).repeat(2, 1, 1) + torch.tensor([[[0.3]], [[-0.3]]])}
    mcmc = MCMC(kernel, num_samples=200, warmup_steps=100, num_chains=2, initial_params=init,
                disable_progbar=True)
    mcmc.run(x, y)
    idata = az.from_pyro(mcmc)
    stats = ps.to_inference_data(mcmc).sample_stats
    assert idata.posterior["weight"].shape[:2] == (2, 200)
    # kernel.model is the full-data view: a log-likelihood for every one of the N points.
    assert idata.log_likelihood["obs"].shape == (2, 200, N)
    assert stats["diverging"].shape == (2, 200) and not stats["diverging"].any()
    assert stats["step_size"].shape == (2, 200)
    summary = az.summary(idata, var_names=["weight"])
    assert np.isfinite(summary["ess_bulk"]).all() and np.isfinite(summary["r_hat"]).all()
    assert (summary["r_hat"] < 1.1).all()


def test_generic_pyro_model_with_its_own_subsampled_plate():
    """Trace path: a hand-written model, a positive (transformed) site, pyro.plate subsampling."""
    torch.set_num_threads(1)
    x, y, mean, cov = _problem()

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(D, dtype=x.dtype), 1.0).to_event(1))
        tau = pyro.sample("tau", dist.LogNormal(torch.tensor(0.0, dtype=x.dtype), 0.1))
        with pyro.plate("data", x.shape[0], subsample_size=50) as idx:
            pyro.sample("obs", dist.Normal(x[idx] @ w, SIGMA * tau), obs=y[idx])

    kernel = SGHMC(model, step_size=8e-4, friction=0.5, steps_per_sample=4)
    mcmc = MCMC(kernel, num_samples=200, warmup_steps=100, disable_progbar=True)
    mcmc.run(x, y)
    samples = mcmc.get_samples()
    assert (samples["tau"] > 0).all()             # returned in the constrained space
    assert ((samples["w"].mean(0) - mean).abs() / cov.diag().sqrt()).max() < 0.5


def test_schedules_and_bad_arguments():
    assert PolynomialDecay(1.0, decay_steps=10, power=1.0)(10) == pytest.approx(0.5)
    s = CyclicalCosine(2.0, cycle_length=4)
    assert [s(t) for t in range(5)] == pytest.approx([2.0, 1 + math.cos(math.pi / 4), 1.0, 1 - math.cos(math.pi / 4), 2.0])
    with pytest.raises(ValueError, match="friction"):
        SGHMC(_model(), step_size=1e-3, friction=0.0)
    with pytest.raises(ValueError, match="preconditioner"):
        SGHMC(_model(), step_size=1e-3, preconditioner="adam")
    with pytest.raises(ValueError, match="step_size"):
        SGHMC(_model(), step_size=-1.0)


def test_too_large_step_adapts_or_warns():
    """step * curvature ~ 60: a fixed step blows up within a few float32 steps. Adapting (the
    default) from it finds a stable one; with adaptation off, every divergent step is undone
    (never a non-finite or runaway draw), counted, and the run warns once."""
    torch.set_num_threads(1)
    x, y, mean, cov = _problem(torch.float32)
    kernel = SGHMC(_model(torch.float32), step_size=0.5, friction=0.5, steps_per_sample=5)
    mcmc = MCMC(kernel, num_samples=300, warmup_steps=100, disable_progbar=True)
    mcmc.run(x, y)
    assert mcmc.diagnostics()["divergences"]["chain 0"] == []
    assert kernel.adapted_step_size < 0.01
    w = mcmc.get_samples()["weight"].reshape(-1, D).double()
    assert ((w.mean(0) - mean).abs() / cov.diag().sqrt()).max() < 0.3

    kernel = SGHMC(_model(torch.float32), step_size=0.5, friction=0.5, adapt_step_size=False)
    mcmc = MCMC(kernel, num_samples=50, warmup_steps=10, disable_progbar=True)
    with pytest.warns(RuntimeWarning, match="divergent step") as record:
        mcmc.run(x, y)
    assert sum("divergent step" in str(r.message) for r in record) == 1
    div = mcmc.diagnostics()["divergences"]["chain 0"]
    assert len(div) > 0
    w = mcmc.get_samples()["weight"]
    assert torch.isfinite(w).all() and w.abs().max() < 100
