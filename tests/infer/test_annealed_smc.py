"""AnnealedSMC behaves like pyro.infer.MCMC: samples, diagnostics, summary, ArviZ."""

import warnings

import arviz as az
import numpy as np
import pytest
import torch
from torch import nn

from pyro_subnet.infer import AnnealedSMC
from pyro_subnet.nn import BayesianNet


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    x = torch.randn(50, 3)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    model = BayesianNet(net, "classification")
    smc = AnnealedSMC(model, num_particles=32, batch_size=10, num_chains=2, move="mala", resampling="stratified",
                      seed=0, progress=False)
    smc.run(x, y)
    return smc, model, x, y


def test_samples_have_mcmc_shapes_and_sites(fitted):
    smc, model, x, y = fitted
    grouped = smc.get_samples(group_by_chain=True)
    assert list(grouped) == model.layout.names
    for name, shape in model.layout.shapes.items():
        assert grouped[name].shape == (2, 32, *shape)
        assert grouped[name].dtype == torch.float32
    flat = smc.get_samples()
    assert flat["0.weight"].shape == (64, 8, 3)
    assert torch.equal(flat["0.weight"][32:], grouped["0.weight"][1])
    assert smc.get_samples(num_samples=5)["2.bias"].shape == (5, 3)
    # Independent chains: different particles.
    assert not torch.allclose(grouped["2.bias"][0].mean(0), grouped["2.bias"][1].mean(0))


def test_diagnostics_record_every_step(fitted):
    smc, *_ = fitted
    d = smc.diagnostics()
    assert d["divergences"] == {"chain 0": [], "chain 1": []}
    for c in ("chain 0", "chain 1"):
        steps = d["num_steps"][c]
        assert all(len(d[k][c]) == steps for k in ("ess", "acceptance_rate", "resampled", "num_data", "level"))
        assert d["num_data"][c][-1] == 50 and d["level"][c][-1] == 5.0
        assert all(0 <= a <= 1 for a in d["acceptance_rate"][c]) and all(0 < e <= 32 for e in d["ess"][c])
        # Rounds of 5 MALA moves until decorrelated: 1 + (moves) gradient passes per SMC step.
        moves = d["num_mcmc_steps"][c]
        assert all(m % 5 == 0 and 5 <= m <= 50 for m in moves)
        assert d["grad_evals"][c] == steps + sum(moves)
        assert all(r <= 0.5 or m == 50 for r, m in zip(d["move_correlation"][c], moves))
        assert d["log_evidence"][c] == float(smc.log_evidence[int(c[-1])])
    assert np.isfinite(smc.log_evidence.numpy()).all()


def test_arviz_from_pyro_gives_posterior_and_exact_log_likelihood(fitted):
    smc, model, x, y = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # arviz warns when it drops log_likelihood
        idata = az.from_pyro(smc)
    assert {"posterior", "log_likelihood", "sample_stats", "observed_data"} <= set(idata.groups())
    assert idata.posterior["0.weight"].shape == (2, 32, 8, 3)
    ll = idata.log_likelihood["obs"].values
    theta = smc.particles().reshape(64, -1)
    expected = smc.bridge.log_likelihood(theta, x, y).detach().reshape(2, 32, 50).numpy()
    np.testing.assert_allclose(ll, expected, rtol=1e-4, atol=1e-5)
    loo = az.loo(idata, reff=1.0)
    # elpd_loo is below the in-sample log pointwise predictive density.
    lppd = float(np.sum(np.log(np.exp(expected.reshape(64, 50)).mean(0))))
    assert np.isfinite(loo.elpd_loo) and loo.elpd_loo <= lppd


def test_summary_prints_a_table_and_the_evidence(fitted, capsys):
    smc, *_ = fitted
    smc.summary(sites=["2.bias"])
    out = capsys.readouterr().out
    assert "2.bias[0]" in out and "r_hat" in out and "log evidence" in out


def test_bad_arguments_raise_clear_errors():
    model = BayesianNet(nn.Linear(2, 1), "regression")
    with pytest.raises(TypeError, match="BayesianNet"):
        AnnealedSMC(nn.Linear(2, 1), 8, 4)
    with pytest.raises(ValueError, match="schedule"):
        AnnealedSMC(model, 8, 4, schedule="geometric")
    with pytest.raises(ValueError, match="batch_size"):
        AnnealedSMC(model, 8, 0, schedule="adaptive")
    with pytest.raises(ValueError, match="covariance"):
        AnnealedSMC(model, 8, 4, covariance="full")
    with pytest.raises(ValueError, match="move"):
        AnnealedSMC(model, 8, 4, move="nuts")
    with pytest.raises(ValueError, match="resampling"):
        AnnealedSMC(model, 8, 4, resampling="residual")
    smc = AnnealedSMC(model, 8, 4, progress=False)
    with pytest.raises(RuntimeError, match="run"):
        smc.get_samples()
    with pytest.raises(ValueError, match="targets y"):
        smc.run(torch.randn(5, 2), None)
