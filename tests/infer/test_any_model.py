"""Every method on a user-written PyroModule (Pyro's tutorial style, its own priors), beside the
same network built with BayesianNet; a latent noise scale learned or sampled by each method."""

import arviz as az
import pyro
import torch
from pyro.infer import MCMC

import pyro_subnet as ps
from pyro_subnet.nn import ModelBridge

from bnn_models import ClassifierBNN, RegressionBNN, bayesian_net_twin


def _same_start(user, twin, x):
    """The twin starts from the user model's initial weights (its prior draw), so both runs are
    the same computation."""
    values = list(ModelBridge(user, x).initial_values().values())
    with torch.no_grad():
        for p, v in zip(twin.network.module.parameters(), values):
            p.copy_(v)
    twin.network._init = {n: v.clone() for n, v in zip(twin.layout.names, values)}


def _accuracy_of_every_method(model, ds, seed=0):
    x, y, xt, yt = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    out = {}
    pyro.set_rng_seed(seed)
    theta = ps.infer.fit_map(model, x, y, num_steps=400, lr=1e-2, progress=False).theta
    sub = ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.LargestMagnitude(40), prior_precision="marglik",
                                     progress=False).fit(x, y, map_theta=theta)
    out["AutoSubnetLaplace"] = sub.predict(xt)
    sampled = ps.infer.AutoSampledLaplace(model, num_posterior_samples=8, max_iter=50, progress=False, seed=0)
    out["AutoSampledLaplace"] = sampled.fit(x, y, map_theta=theta).predict(xt)
    out["AnalyticPredictive"] = ps.infer.AnalyticPredictive(model, sub)(xt)["probs"]
    bridge = ModelBridge(model, x)
    # A fixed step and no warm start: the twins then take identical steps (the equivalence under test).
    fixed = dict(step_size=2e-4, subsample_size=32, adapt_step_size=False, warm_start_fraction=0.0)
    for name, kernel in (("SGHMC", ps.infer.SGHMC(model, **fixed)),
                         ("SpikeSlabSGHMC", ps.infer.SpikeSlabSGHMC(model, target_sparsity=0.3, **fixed))):
        pyro.set_rng_seed(seed)
        mcmc = MCMC(kernel, num_samples=30, warmup_steps=60, initial_params=bridge.layout.unflatten(theta),
                    disable_progbar=True)
        mcmc.run(x, y)
        draws = bridge.layout.flatten(mcmc.get_samples())
        out[name] = torch.softmax(bridge.network.flat_batched(draws, xt), -1).mean(0)
    smc = ps.infer.AnnealedSMC(model, num_particles=64, batch_size=32, seed=seed, move="hmc", num_mcmc_steps=10,
                               progress=False)
    smc.run(x, y)
    out["AnnealedSMC"] = torch.softmax(bridge.network.flat_batched(smc.particles()[0], xt), -1).mean(0)
    return {k: ps.metrics.accuracy(p, yt) for k, p in out.items()}


def test_a_categorical_pyromodule_through_all_six_methods():
    """Accuracy of each method on the user's model within 2 points of the same model as a
    BayesianNet (both from the same initial weights), and well above chance."""
    ds = ps.data.load_wine()
    torch.manual_seed(0)
    user = ClassifierBNN(13, 8, 3)
    twin = bayesian_net_twin(user, "classification")
    _same_start(user, twin, ds.x_train)
    mine, theirs = _accuracy_of_every_method(user, ds), _accuracy_of_every_method(twin, ds)
    assert set(mine) == {"AutoSubnetLaplace", "AutoSampledLaplace", "AnalyticPredictive", "SGHMC", "SpikeSlabSGHMC",
                         "AnnealedSMC"}
    for method in mine:
        assert abs(mine[method] - theirs[method]) <= 0.02 + 1e-9, (method, mine[method], theirs[method])
        assert mine[method] > 0.6, (method, mine[method])


def _noisy_sine(n=200, noise=0.1):
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 2, n)[:, None]
    return x, torch.sin(2 * x[:, 0]) + noise * torch.randn(n, generator=g)


def test_a_latent_noise_scale_is_learned_or_sampled_within_20_percent():
    """200 points of 1-D regression with noise 0.1: the Laplace guides tune sigma by the evidence
    (from its MAP); SGHMC and SpikeSlabSGHMC sample it with its HalfNormal prior."""
    x, y = _noisy_sine()
    torch.manual_seed(0)
    model = RegressionBNN(h=20)
    bridge = ModelBridge(model, x)
    fit = ps.infer.fit_map(bridge, x, y, num_steps=1500, progress=False)
    estimates = {"MAP": fit.noise_scale}
    for guide in (ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.All(), prior_precision="marglik", progress=False),
                  ps.infer.AutoSampledLaplace(model, num_posterior_samples=8, prior_precision="em", max_iter=50,
                                              progress=False)):
        guide.fit(x, y, map_theta=fit.theta)
        estimates[type(guide).__name__] = float(guide.median()["sigma"])
    init = {**bridge.layout.unflatten(fit.theta), "sigma": torch.tensor(fit.noise_scale).log()}   # (unconstrained)
    for kernel in (ps.infer.SGHMC(model, step_size=1e-5, subsample_size=50),
                   ps.infer.SpikeSlabSGHMC(model, step_size=1e-5, subsample_size=50, target_sparsity=0.3)):
        pyro.set_rng_seed(0)
        mcmc = MCMC(kernel, num_samples=200, warmup_steps=200, initial_params=init, disable_progbar=True)
        mcmc.run(x, y)
        sigma = mcmc.get_samples()["sigma"]
        assert sigma.std() > 0                                 # sampled, not fixed
        estimates[type(kernel).__name__] = float(sigma.mean())
    for method, value in estimates.items():
        assert abs(value / 0.1 - 1) < 0.2, (method, value)


def test_annealed_smc_samples_a_latent_noise_scale_with_its_defaults():
    """The same problem for AnnealedSMC with its defaults (fewer particles), sigma a latent of
    every particle with its HalfNormal prior: the default start for a learned noise is a diagonal
    Laplace fit, from which the particles find the data's noise (from the prior they settle near
    0.36, where the noise explains the signal)."""
    x, y = _noisy_sine()
    torch.manual_seed(0)
    smc = ps.infer.AnnealedSMC(RegressionBNN(h=20), num_particles=64, seed=0, progress=False)
    smc.run(x, y)
    sigma = smc.get_samples()["sigma"]
    assert sigma.std() > 0 and abs(float(sigma.mean()) / 0.1 - 1) < 0.15, float(sigma.mean())


def test_guides_and_samplers_speak_the_models_site_names():
    x, y = _noisy_sine(n=60)
    torch.manual_seed(0)
    model = RegressionBNN(h=8)
    names = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "sigma"}
    guide = ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.All(), prior_precision="marglik", map_steps=400,
                                       progress=False).fit(x, y)
    assert set(guide.median()) == names and guide.median()["fc1.weight"].shape == (8, 1)
    q = guide.quantiles([0.05, 0.95])
    assert set(q) == names and q["fc2.weight"].shape == (2, 1, 8) and (q["fc2.weight"][1] >= q["fc2.weight"][0]).all()
    assert torch.all(q["sigma"] == guide.median()["sigma"])                       # a point: tuned, not sampled
    draws = pyro.infer.Predictive(model, guide=guide, num_samples=4)(x)
    assert names <= set(draws) and draws["obs"].shape == (4, 60)
    mean, var = guide.predict(x)
    assert mean.shape == var.shape == (60, 1) and (var > float(guide.median()["sigma"]) ** 2 * 0.99).all()
    idata = ps.to_inference_data(guide, x, y, num_samples=10)
    assert set(idata.posterior.data_vars) == names and idata.log_likelihood["obs"].shape == (2, 10, 60)
    kernel = ps.infer.SGHMC(model, step_size=1e-5, subsample_size=30)
    mcmc = MCMC(kernel, num_samples=10, warmup_steps=10, num_chains=2, disable_progbar=True)
    mcmc.run(x, y)
    smc = ps.infer.AnnealedSMC(model, num_particles=16, batch_size=30, num_chains=2, progress=False)
    smc.run(x, y)
    for sampler in (mcmc, smc):
        for idata in (az.from_pyro(sampler), ps.to_inference_data(sampler)):
            assert set(idata.posterior.data_vars) == names
            assert idata.log_likelihood["obs"].shape[-1] == 60          # ArviZ's own log-likelihood too
            assert torch.isfinite(torch.as_tensor(idata.log_likelihood["obs"].values)).all()
