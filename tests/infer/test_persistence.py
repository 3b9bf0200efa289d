"""Every fitted object survives torch.save / pickle / state_dict, and samplers resume exactly."""

import io
import pickle

import pyro
import pytest
import torch
from pyro.infer import MCMC
from torch import nn

import pyro_subnet as ps
from pyro_subnet.infer.smc import annealed


def _regression_model(seed=0, noise_scale=None):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 1))
    return ps.nn.BayesianNet(net, likelihood="regression", noise_scale=noise_scale)


def _guide(kind, model):
    if kind == "subnet":
        return ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.LargestMagnitude(12), prior_precision="marglik",
                                          map_steps=200, progress=False)
    if kind == "diagonal":
        return ps.infer.AutoDiagonalLaplace(model, prior_precision="marglik", map_steps=200, progress=False)
    return ps.infer.AutoSampledLaplace(model, num_posterior_samples=8, prior_precision="em", num_em_steps=3,
                                       map_steps=200, max_iter=50, progress=False)


def _torch_roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("kind", ["subnet", "sampled", "diagonal"])
def test_laplace_guides_round_trip_with_learned_noise(kind):
    ds = ps.data.gap_regression(n=40)
    model = _regression_model()
    guide = _guide(kind, model).fit(ds.x_train, ds.y_train)
    learned = model.noise_scale
    assert abs(learned - 1.0) > 0.1                      # the noise was learned, away from its start
    mean0, var0 = guide.predict(ds.x_test)
    # (the sampled guide has no closed-form evidence)
    evidence = float(guide.log_marginal_likelihood()) if kind != "sampled" else None

    copies = {"torch.save": _torch_roundtrip(guide), "pickle": pickle.loads(pickle.dumps(guide))}
    fresh = _guide(kind, _regression_model(seed=1))      # another model, other weights, noise at 1
    fresh.load_state_dict(guide.state_dict())
    copies["state_dict"] = fresh
    for how, g in copies.items():
        mean, var = g.predict(ds.x_test)
        assert torch.allclose(mean, mean0, atol=1e-6, rtol=0) and torch.allclose(var, var0, atol=1e-6, rtol=0), how
        assert g.model.noise_scale == pytest.approx(learned, rel=1e-12), how
        assert torch.equal(g.prior_prec, guide.prior_prec), how
        if evidence is not None:
            assert float(g.log_marginal_likelihood()) == pytest.approx(evidence, rel=1e-6), how
    # Saving did not change the live guide.
    mean, var = guide.predict(ds.x_test)
    assert torch.equal(mean, mean0) and torch.equal(var, var0)
    draws = pyro.infer.Predictive(fresh.model, guide=fresh, num_samples=4)(ds.x_test)
    assert draws["obs"].shape == (4, len(ds.x_test))


def test_classification_guide_state_dict_keeps_the_tuned_prior():
    ds = ps.data.two_moons(n=80)
    torch.manual_seed(0)
    model = ps.nn.BayesianNet(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)), "classification")
    guide = ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.All(), prior_precision="marglik", map_steps=200,
                                       progress=False).fit(ds.x_train, ds.y_train)
    torch.manual_seed(5)
    fresh = ps.infer.AutoSubnetLaplace(ps.nn.BayesianNet(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)),
                                                         "classification"), subnet=ps.subnet.All())
    fresh.load_state_dict(guide.state_dict())
    assert float(guide.prior_prec[0]) != pytest.approx(1.0)        # tuned away from the model's prior
    assert torch.allclose(fresh.predict(ds.x_test), guide.predict(ds.x_test), atol=1e-6, rtol=0)
    assert float(fresh.log_marginal_likelihood()) == pytest.approx(float(guide.log_marginal_likelihood()))


def _kernel(kind):
    model = _regression_model(seed=0)
    if kind == "sghmc":
        return ps.infer.SGHMC(model, step_size=1e-3, friction=0.3, preconditioner="vb", subsample_size=16)
    return ps.infer.SpikeSlabSGHMC(model, step_size=1e-3, friction=0.3, subsample_size=16, target_sparsity=0.5)


@pytest.mark.parametrize("kind", ["sghmc", "spike_slab"])
def test_sgmcmc_chain_resumes_where_it_stopped(kind):
    """30 draws, save the kernel state, continue for 10 in a fresh kernel (and a fresh model):
    the same 10 draws as draws 31-40 of one uninterrupted run, learned noise and EM state included."""
    x = torch.linspace(-2, 2, 64)[:, None]
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    kernel = _kernel(kind)
    pyro.set_rng_seed(1)
    MCMC(kernel, num_samples=30, warmup_steps=20, disable_progbar=True).run(x, y)
    rng = torch.get_rng_state()
    saved = _torch_roundtrip(kernel.state_dict())
    resumed = _kernel(kind)
    resumed.load_state_dict(saved)
    torch.set_rng_state(rng)
    cont = MCMC(resumed, num_samples=10, warmup_steps=0, disable_progbar=True)
    cont.run(x, y)

    whole = _kernel(kind)
    pyro.set_rng_seed(1)
    ref = MCMC(whole, num_samples=40, warmup_steps=20, disable_progbar=True)
    ref.run(x, y)
    for site, draws in cont.get_samples().items():
        assert torch.equal(draws, ref.get_samples()[site][30:]), site
    assert resumed._model.noise_scale == whole._model.noise_scale
    if kind == "spike_slab":
        for site, p in whole.inclusion_probabilities().items():
            assert torch.equal(resumed.inclusion_probabilities()[site], p)
    assert isinstance(_torch_roundtrip(whole), type(whole))           # the kernel itself pickles


def test_sgmcmc_load_state_dict_rejects_another_model():
    kernel = _kernel("sghmc")
    with pytest.raises(ValueError, match="not a kernel state"):
        kernel.load_state_dict({"theta": torch.zeros(3)})
    kernel.load_state_dict({"theta": torch.zeros(3), "velocity": torch.zeros(3), "precond_scale": torch.ones(3),
                            "precond_curvature": torch.zeros(3), "precond_count": 0, "step_size": 1e-3, "noise": None,
                            "num_steps": 1, "noise_var": None})
    with pytest.raises(ValueError, match="3 coordinates, this model 31"):
        MCMC(kernel, num_samples=2, warmup_steps=0, disable_progbar=True).run(torch.randn(8, 1), torch.randn(8))


@pytest.mark.parametrize("noise_scale", [0.3, None])
def test_annealed_smc_resumes_from_a_checkpoint(tmp_path, monkeypatch, noise_scale):
    """A run interrupted in its first chain and continued from its last checkpoint ends exactly
    where the uninterrupted run ends (both chains, the evidence, a learned noise)."""
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0))
    y = x[:, 0] + 0.3 * torch.randn(40, generator=torch.Generator().manual_seed(1))

    def make():      # the same network each time: a learned noise starts from its Laplace fit
        torch.manual_seed(0)
        model = ps.nn.BayesianNet(nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)), "regression",
                                  noise_scale=noise_scale)
        return ps.infer.AnnealedSMC(model, num_particles=32, batch_size=10, seed=3, num_chains=2, progress=False)

    ref = make()
    ref.run(x, y)
    interrupted, calls, step = make(), [0], annealed.step

    def crash_at_the_fifth_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return step(*args, **kwargs)
    monkeypatch.setattr(annealed, "step", crash_at_the_fifth_step)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(x, y, checkpoint=str(tmp_path / "smc.pt"), checkpoint_every=2)
    monkeypatch.setattr(annealed, "step", step)
    resumed = make()
    resumed.load_state_dict(torch.load(tmp_path / "smc.pt", weights_only=False))
    assert len(resumed.state_dict()["run"]["current"]["infos"]) == 4      # the checkpoint after step 4
    resumed.run(x, y, resume=True)
    for site, draws in ref.get_samples(group_by_chain=True).items():
        assert torch.equal(resumed.get_samples(group_by_chain=True)[site], draws), site
    assert torch.equal(resumed.log_evidence, ref.log_evidence)
    assert resumed.model.noise_scale == ref.model.noise_scale
    with pytest.raises(ValueError, match="no unfinished run"):
        resumed.run(x, y, resume=True)
    other = make()
    other.load_state_dict(ref.state_dict())          # a finished run: the draws come back
    assert torch.equal(other.particles(), ref.particles())
    for copy in (_torch_roundtrip(ref), pickle.loads(pickle.dumps(ref))):
        assert torch.equal(copy.particles(), ref.particles()) and torch.equal(copy.log_evidence, ref.log_evidence)
    with pytest.raises(ValueError, match="not the data"):
        interrupted_again = make()
        interrupted_again.load_state_dict(torch.load(tmp_path / "smc.pt", weights_only=False))
        interrupted_again.run(x + 1, y, resume=True)
