"""SGHMC right by default on networks: the failures a hand-picked step size used to hide."""

import pyro
import pytest
import torch
from bnn_models import RegressionBNN
from pyro.infer import MCMC

import pyro_subnet as ps
from pyro_subnet.infer import SGHMC
from pyro_subnet.infer.map import fit_map
from pyro_subnet.infer.mcmc import step_size as step_size_lib


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
    """preconditioner='vb' on a model with sigma ~ HalfNormal(1): sigma stays positive and finite
    (it once collapsed to 0 with a NaN log density), with a finite log density at every draw. The
    warm start holds sigma small while Adam fits the weights, then frees it: climbing both at once
    it settled where a large sigma (about 0.3, the MAP fitted jointly from the start,
    ``noise_warmup=0``) calls the signal noise. The posterior's noise is about 0.1 (fit_map's
    default warm-up; Pyro's NUTS on this model); the chain's draws, on mini-batches of a quarter
    of the data, stay above it (docs/measured.md) but far below the noise-as-signal mode."""
    torch.set_num_threads(1)
    x, y = _data(100)
    pyro.set_rng_seed(0)
    kernel = SGHMC(RegressionBNN(h=20), preconditioner="vb", subsample_size=25, steps_per_sample=10)
    mcmc = MCMC(kernel, num_samples=100, warmup_steps=600, disable_progbar=True)
    mcmc.run(x, y)
    sigma = mcmc.get_samples()["sigma"]
    assert (sigma > 0).all() and torch.isfinite(sigma).all()
    pyro.set_rng_seed(0)
    posterior_mode = fit_map(RegressionBNN(h=20), x, y, num_steps=1500, progress=False).noise_scale
    pyro.set_rng_seed(0)
    joint_mode = fit_map(RegressionBNN(h=20), x, y, num_steps=1500, progress=False, noise_warmup=0).noise_scale
    assert 0.08 < posterior_mode < 0.11 and joint_mode > 0.25
    assert posterior_mode < float(sigma.mean()) < 0.75 * joint_mode, (float(sigma.mean()), posterior_mode, joint_mode)
    lp = torch.tensor(mcmc.diagnostics()["lp"]["chain 0"])
    assert torch.isfinite(lp).all()


def test_auto_friction_is_underdamped_at_the_prior_and_raised_against_gradient_noise():
    """``propose`` with a curvature floor: full batch, alpha = sqrt(eps lambda_min) at the curvature
    bound's step; with gradient noise q, alpha is raised so that that step stays within the noise
    bound (clipped to MAX_FRICTION), and the step follows."""
    state = step_size_lib.init(1.0)._replace(lambda_max=1e4)
    scale = torch.ones(3)
    full, alpha = step_size_lib.propose(state, scale, 0.1, curvature_floor=2.0)
    assert full.step_size == pytest.approx(0.25 / 1e4)
    assert alpha == pytest.approx((0.25 / 1e4 * 2.0) ** 0.5)
    noisy = step_size_lib.observe_noise(state, torch.full((3,), 1e3))      # gradient noise V = q = 1000
    q = float(step_size_lib.grad_noise(noisy)[0])
    stepped, alpha = step_size_lib.propose(noisy, scale, 0.1, curvature_floor=2.0)
    assert alpha == pytest.approx(0.25 / 1e4 * q / 0.4)
    assert stepped.step_size == pytest.approx(0.25 / 1e4)
    loud = step_size_lib.observe_noise(state, torch.full((3,), 1e5))
    stepped, alpha = step_size_lib.propose(loud, scale, 0.1, curvature_floor=2.0)
    assert alpha == step_size_lib.MAX_FRICTION
    assert stepped.step_size == pytest.approx(0.4 * step_size_lib.MAX_FRICTION / float(step_size_lib.grad_noise(loud)[0]))
    assert step_size_lib.propose(state, scale, 0.1)[1] == 0.1                 # no floor: the given friction


def test_auto_friction_samples_a_direction_only_the_prior_bounds():
    """Linear regression whose second input is always 0: its weight's posterior is the prior
    N(0, 1) (curvature 1) while the first weight's is 1e4 times stiffer, which sets the step size.
    The derived friction lets that flat direction move through its whole prior spread; a fixed
    alpha = 0.1 is about 70 times overdamped there (its draws' variance was 0.25 in 10,000 steps)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100, 1, generator=g), torch.zeros(100, 1)], 1).double()
    y = 0.7 * x[:, 0] + 0.1 * torch.randn(100, generator=g, dtype=torch.float64)
    exact = torch.diag(torch.linalg.inv(x.T @ x / 0.01 + torch.eye(2, dtype=torch.float64)))
    pyro.set_rng_seed(0)
    model = ps.nn.BayesianNet(torch.nn.Linear(2, 1, bias=False).double(), likelihood="regression",
                              noise_scale=0.1, prior_scale=1.0)
    kernel = SGHMC(model, steps_per_sample=10)
    mcmc = MCMC(kernel, num_samples=1000, warmup_steps=200, num_chains=2, disable_progbar=True)
    mcmc.run(x, y)
    step = kernel.adapted_step_size
    assert kernel.friction == pytest.approx((step * 1.0) ** 0.5, rel=1e-6)    # sqrt(eps * min prior precision)
    w = mcmc.get_samples()["weight"].reshape(-1, 2)
    ratio = w.var(0) / exact
    assert 0.6 < float(ratio[1]) < 1.5 and 0.75 < float(ratio[0]) < 1.35, ratio
