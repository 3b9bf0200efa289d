"""Issue 8 acceptance: ``ps.to_inference_data`` for every method passes ArviZ's summary, ESS,
R-hat and LOO without extra arguments, and carries the method's own statistics.

NUTS (both model kinds) is in ``test_inference_data.py``. SGHMC and the guide run on a
batch-aware BayesianNet and on a plain ``PyroModule[nn.Linear]`` model; SpikeSlabSGHMC and
AnnealedSMC need a BayesianNet, so they are tested on that only.
"""

import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import xarray as xr
from pyro.infer import MCMC, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from test_inference_data import PlainLinearNet, _data
from torch import nn

import pyro_subnet as ps
from pyro_subnet.diagnostics import arviz_io
from pyro_subnet.diagnostics.arviz_io import group_names, summary_numbers
from pyro_subnet.infer import AnnealedSMC, SGHMC, SpikeSlabSGHMC

GROUPS = {"posterior", "sample_stats", "log_likelihood", "posterior_predictive", "observed_data"}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: thread start-up dominates, and on a loaded 2-core machine it costs 100x.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(kind):
    return ps.nn.BayesianNet(nn.Linear(2, 3), "classification") if kind == "net" else PlainLinearNet()


def _weights(idata, kind, c, s):
    pre = "fc." if kind == "plain" else ""
    return (torch.as_tensor(idata.posterior[pre + "weight"].values[c, s]),
            torch.as_tensor(idata.posterior[pre + "bias"].values[c, s]))


def _check_arviz(idata, kind, x, y, chains, draws):
    """Every group; the pointwise log-likelihood equals a direct evaluation; ArviZ's functions run
    without arguments and give finite numbers."""
    assert GROUPS <= set(group_names(idata))
    assert idata.log_likelihood["obs"].shape == (chains, draws, len(x))
    for c, s in ((0, 0), (chains - 1, draws - 1)):
        w, b = (t.to(x.dtype) for t in _weights(idata, kind, c, s))     # ArviZ holds float64
        direct = dist.Categorical(logits=x @ w.T + b).log_prob(y).numpy()
        np.testing.assert_allclose(idata.log_likelihood["obs"].values[c, s], direct, atol=1e-5)
    assert np.array_equal(idata.observed_data["obs"].values, y.numpy())
    assert idata.posterior_predictive["obs"].shape == (chains, draws, len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # Pareto-k warnings on 24 points are expected
        summary = az.summary(idata)
        ess, rhat, loo = az.ess(idata), az.rhat(idata), az.loo(idata)
    assert np.isfinite(summary["r_hat"]).all() and np.isfinite(summary["ess_bulk"]).all()
    assert np.isfinite(ess.to_array()).all() and np.isfinite(rhat.to_array()).all()
    # elpd_loo is a sum of 24 log predictive probabilities of 3 classes: between 24 log(1/3)
    # (a coin) and 0, for data this separable.
    assert 24 * np.log(1 / 3) < loo.elpd_loo < 0
    return summary


@pytest.mark.parametrize("kind", ["net", "plain"])
def test_sghmc(kind):
    x, y = _data()
    pyro.set_rng_seed(0)
    kernel = SGHMC(_model(kind), step_size=2e-2, friction=0.5, steps_per_sample=5)
    mcmc = MCMC(kernel, num_samples=40, warmup_steps=20, num_chains=2, disable_progbar=True)
    mcmc.run(x, y)
    idata = ps.to_inference_data(mcmc)
    _check_arviz(idata, kind, x, y, 2, 40)
    st = idata.sample_stats
    # Adapted in warm-up (from 2e-2), then fixed: one value per chain.
    steps = st["step_size"].values
    assert np.all(steps == steps[:, :1]) and np.all(steps > 0) and not st["diverging"].values.any()
    np.testing.assert_allclose(st["lp_minibatch"].values,
                               [mcmc.diagnostics()["lp"][f"chain {i}"] for i in range(2)])
    # lp is the exact full-data log joint at the draw: the mini-batch lp (all data here, averaged
    # over the 5 thinned steps before the draw) tracks it.
    assert np.corrcoef(st["lp"].values.ravel(), st["lp_minibatch"].values.ravel())[0, 1] > 0.5


def test_spike_slab_sghmc():
    x, y = _data()
    pyro.set_rng_seed(0)
    kernel = SpikeSlabSGHMC(_model("net"), step_size=2e-2, friction=0.5, spike_scale=0.1, steps_per_sample=5)
    mcmc = MCMC(kernel, num_samples=40, warmup_steps=20, num_chains=2, disable_progbar=True)
    mcmc.run(x, y)
    idata = ps.to_inference_data(mcmc)
    _check_arviz(idata, "net", x, y, 2, 40)
    diag = mcmc.diagnostics()
    for name in ("sparsity", "inclusion_rate", "step_size"):
        np.testing.assert_array_equal(idata.sample_stats[name].values,
                                      [diag[name][f"chain {i}"] for i in range(2)])
    assert np.all(idata.sample_stats["inclusion_rate"].values == 0.5)   # delta fixed by default


def test_spike_slab_pruning_sparsity_matches_the_draws():
    x, y = _data()
    pyro.set_rng_seed(0)
    model = ps.nn.BayesianNet(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)), "classification")
    kernel = SpikeSlabSGHMC(model, step_size=1e-2, friction=0.5, spike_scale=0.1, target_sparsity=0.5)
    mcmc = MCMC(kernel, num_samples=10, warmup_steps=20, disable_progbar=True)
    mcmc.run(x, y)
    idata = ps.to_inference_data(mcmc)
    zeros = np.concatenate([(idata.posterior[n].values == 0).reshape(1, 10, -1)
                            for n in ("0.weight", "2.weight")], -1).mean(-1)
    np.testing.assert_allclose(idata.sample_stats["sparsity"].values, zeros)
    assert np.allclose(zeros, 0.5, atol=1 / 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isfinite(az.loo(idata).elpd_loo)


def test_annealed_smc():
    x, y = _data()
    torch.manual_seed(0)
    smc = AnnealedSMC(_model("net"), num_particles=32, batch_size=8, num_chains=2, seed=0, progress=False)
    smc.run(x, y)
    idata = ps.to_inference_data(smc)
    _check_arviz(idata, "net", x, y, 2, 32)
    d, st = smc.diagnostics(), idata.sample_stats
    np.testing.assert_allclose(st["log_evidence"].values[:, 0], smc.log_evidence.numpy())
    for c in range(2):
        ess = d["ess"][f"chain {c}"]
        assert st["final_ess"].values[c, 0] == ess[-1] and np.all(st["final_ess"].values[c] == ess[-1])
        steps = idata.step_stats
        np.testing.assert_allclose(steps["ess"].values[c, :len(ess)], ess)
        assert np.isnan(steps["ess"].values[c, len(ess):]).all()       # padded to the longer chain
        assert steps["num_data"].values[c, len(ess) - 1] == len(x)


@pytest.mark.parametrize("kind", ["net", "plain"])
def test_auto_normal_guide(kind):
    x, y = _data()
    pyro.set_rng_seed(0)
    model = _model(kind)
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(100):
        svi.step(x, y)
    idata = ps.to_inference_data(guide, x, y, num_samples=25)
    summary = _check_arviz(idata, kind, x, y, 2, 25)
    # Independent draws split in two chains: R-hat is 1 up to Monte Carlo error.
    assert (summary["r_hat"] < 1.2).all()
    # The draws follow the guide: their mean is the guide's location.
    name = "fc.weight" if kind == "plain" else "weight"
    loc = guide.median()[name].detach().numpy()
    sd = idata.posterior[name].values.std((0, 1))
    assert (np.abs(idata.posterior[name].values.mean((0, 1)) - loc) < 4 * sd / np.sqrt(50)).all()


def test_summary_numbers():
    x, y = _data()
    smc = AnnealedSMC(_model("net"), num_particles=32, batch_size=8, num_chains=2, seed=0, progress=False)
    smc.run(x, y)
    idata = ps.to_inference_data(smc)
    out = summary_numbers(idata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = az.summary(idata)
        loo = az.loo(idata)
    assert abs(out["ess_bulk_min"] - ref["ess_bulk"].min()) <= 0.5     # summary rounds ESS
    assert np.isclose(out["r_hat_max"], ref["r_hat"].max(), atol=0.01)
    assert np.isclose(out["elpd_loo"], loo.elpd_loo)
    assert out["pareto_k_bad"] == float((np.asarray(loo.pareto_k) > 0.7).mean())


def test_arviz_1_branch_builds_a_well_formed_datatree(monkeypatch):
    """ArviZ 1.x needs Python 3.12; here its ``from_dict`` is replaced by a stand-in that checks
    the call it would get (one nested dict, root attrs under "/") and builds the DataTree."""
    import arviz

    calls = []

    def from_dict(data, *, attrs=None, **kwargs):
        assert not kwargs and isinstance(data, dict) and attrs["/"]["inference_library"] == "pyro_subnet"
        calls.append(data)
        tree = {}
        for group, variables in data.items():
            sample = () if "data" in group else ("chain", "draw")
            tree["/" + group] = xr.Dataset({
                k: (sample + tuple(f"{k}_dim_{i}" for i in range(v.ndim - len(sample))), v)
                for k, v in variables.items()})
        return xr.DataTree.from_dict(tree)

    monkeypatch.setattr(arviz_io, "arviz_major", lambda: 1)
    monkeypatch.setattr(arviz, "from_dict", from_dict)
    x, y = _data()
    smc = AnnealedSMC(_model("net"), num_particles=8, batch_size=12, num_chains=2, seed=0, progress=False)
    smc.run(x, y)
    tree = ps.to_inference_data(smc)
    assert isinstance(tree, xr.DataTree)
    (data,) = calls
    assert set(data) == GROUPS
    for group, variables in data.items():
        for k, v in variables.items():
            assert isinstance(v, np.ndarray), (group, k)
            if group != "observed_data":
                assert v.shape[:2] == (2, 8), (group, k, v.shape)
    assert data["observed_data"]["obs"].shape == (24,)
    assert set(group_names(tree)) == GROUPS | {"step_stats"}
    assert tree["step_stats"]["ess"].dims == ("chain", "step")
    assert tree["sample_stats"]["log_evidence"].shape == (2, 8)
