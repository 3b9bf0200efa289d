"""AnnealedSMC's defaults reach the posterior: a 1000-dimensional ill-conditioned Gaussian, and a
small tanh network on gap data against Pyro's NUTS (a stored run that the benchmark module makes
again when it is missing)."""

import importlib.util
from pathlib import Path

import pyro
import torch

import pyro_subnet as ps
from pyro_subnet.infer.smc import annealed
from pyro_subnet.infer.smc.annealed import Adaptive, AnnealedTarget, DataPath, Move

ROOT = Path(__file__).resolve().parents[2]


def _gap_reference():
    spec = importlib.util.spec_from_file_location("gap_reference", ROOT / "benchmarks" / "gap_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_thousand_dimensional_gaussian_with_condition_number_100():
    # Prior N(0, I); 100 "examples", each a hundredth of a Gaussian likelihood, so the posterior
    # has precisions 1 + c_j spread log-uniformly over [1, 100] and means c_j a_j / (1 + c_j).
    d, n, p = 1000, 100, 256
    g = torch.Generator().manual_seed(0)
    precision = torch.logspace(0, 2, d)
    c = precision - 1
    a = 2 * torch.randn(d, generator=g)
    mean, var = c * a / precision, 1 / precision

    def log_lik(t, start, stop):
        return (-0.5 * (c * (t - a) ** 2).sum(-1) / n)[:, None].expand(-1, stop - start)

    target = AnnealedTarget(lambda t: -0.5 * (t ** 2).sum(-1), log_lik, DataPath(n, 10, growth=2.0))
    state = annealed.init(torch.randn(p, d, generator=g))
    while state.level < target.path.num_batches:
        state, _ = annealed.step(g, state, target, Adaptive(0.5), Move())   # the default move
    theta = state.particles
    assert float((theta.mean(0) - mean).norm() / mean.norm()) < 0.1
    ratio = theta.var(0) / var
    # In ten groups of 100 coordinates from the widest to the narrowest: the average
    # variance ratio within 10% (one coordinate's ratio has Monte Carlo error ~ sqrt(2 / P)).
    groups = ratio.reshape(10, 100).mean(1)
    assert float((groups - 1).abs().max()) < 0.1, groups


def test_defaults_on_a_small_network_match_nuts_on_gap_data():
    ref_module = _gap_reference()
    ref = ref_module.nuts_reference(hidden=10, n=40, warmup=200, samples=300,
                                    path=str(ROOT / "tests" / "fixtures" / "nuts_gap_h10_n40_w200_s300.pt"))
    ds, in_gap = ref_module.gap_data(40)
    _, nll_nuts, std_nuts = ref_module.gap_scores(ref["mu"], ds, in_gap)
    model = ref_module.TanhBNN(10)
    smc = ps.infer.AnnealedSMC(model, seed=0, progress=False)
    smc.run(ds.x_train, ds.y_train)
    mu = pyro.infer.Predictive(model, smc.get_samples(), return_sites=["_RETURN"])(ds.x_test)["_RETURN"]
    _, nll, std = ref_module.gap_scores(mu, ds, in_gap)
    # The NLL on the data and the gap ([-2, 2]); beyond the data it rests on the tail of a finite
    # sample (gap_reference.gap_scores).
    assert abs(nll - nll_nuts) < 0.1, (nll, nll_nuts)
    assert abs(std / std_nuts - 1) < 0.2, (std, std_nuts)


def test_defaults_find_the_noise_posterior_of_nuts_on_gap_data():
    """The 1-20-1 gap network with sigma ~ HalfNormal(1) against Pyro's NUTS (stored run, made
    again when missing): the default start (a diagonal Laplace fit, for a learned noise) gives
    NUTS's posterior mean of sigma within 20%. From the prior the particles settle where sigma
    explains the signal, almost 3x NUTS's; NUTS started there walks back to the small noise
    (docs/measured.md), so that is no second posterior mode that NUTS misses."""
    ref_module = _gap_reference()
    ref = ref_module.nuts_reference(hidden=20, n=100, warmup=200, samples=200, learn_noise=True)
    nuts_sigma = float(ref["sigma"].mean())
    ds, _ = ref_module.gap_data(100)
    found = {}
    for start in ("auto", "prior"):
        pyro.set_rng_seed(0)
        smc = ps.infer.AnnealedSMC(ref_module.TanhBNN(20, noise=None), num_particles=64, seed=0, progress=False,
                                   start=start)
        smc.run(ds.x_train, ds.y_train)
        found[start] = float(smc.get_samples()["sigma"].mean())
    assert abs(found["auto"] / nuts_sigma - 1) < 0.2, (found, nuts_sigma)
    assert found["prior"] > 2 * nuts_sigma, (found, nuts_sigma)
