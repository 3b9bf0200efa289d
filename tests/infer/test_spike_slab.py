"""SpikeSlab prior and SpikeSlabSGHMC: exact mixture densities, variable selection on sparse
linear regression, pruning to a target sparsity."""

import math

import pyro
import pytest
import torch
from pyro.infer import MCMC
from torch import nn

from pyro_subnet.distributions import SpikeSlab
from pyro_subnet.infer import SpikeSlabSGHMC
import numpy as np
from pyro_subnet.nn import BayesianNet
import pyro_subnet as ps


def test_spike_slab_density_matches_the_mixture_formula():
    d = SpikeSlab(*torch.tensor([0.05, 2.0, 0.3], dtype=torch.float64))
    w = torch.linspace(-3, 3, 13, dtype=torch.float64)
    normal = lambda s: torch.exp(-0.5 * (w / s) ** 2) / (s * math.sqrt(2 * math.pi))
    p = 0.3 * normal(2.0) + 0.7 * normal(0.05)
    assert torch.allclose(d.log_prob(w).exp(), p, rtol=1e-10)
    assert torch.allclose(d.inclusion_probability(w), 0.3 * normal(2.0) / p, rtol=1e-10)
    e = d.expand((4, 5))
    assert e.batch_shape == (4, 5) and e.sample((3,)).shape == (3, 4, 5)
    s = SpikeSlab(0.1, 1.0, 0.25).sample((200000,))
    assert abs(s.var().item() - (0.25 * 1.0 + 0.75 * 0.01)) < 0.01
    with pytest.raises(ValueError, match="inclusion_prob"):
        SpikeSlab(0.1, 1.0, 1.5)


def test_bayesian_net_accepts_spike_slab_prior():
    prior = SpikeSlab(0.01, 1.0, 0.5)
    model = BayesianNet(nn.Linear(3, 2), likelihood="regression", prior=prior)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    trace = pyro.poutine.trace(model).get_trace(x, y)
    theta = model.layout.flatten({n: trace.nodes[n]["value"] for n in model.layout.names})
    expected = prior.log_prob(theta).sum()
    site_lp = sum(trace.nodes[n]["fn"].log_prob(trace.nodes[n]["value"]) for n in model.layout.names)
    assert torch.allclose(site_lp, expected) and torch.allclose(ps.nn.ModelBridge(model, x).log_prior(theta), expected)
    assert trace.nodes["weight"]["fn"].support.check(trace.nodes["weight"]["value"]).all()


def _sparse_regression(P=50, N=200):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, P, generator=g)
    w = torch.zeros(P)
    w[:5] = torch.tensor([2.0, -1.5, 1.0, -1.0, 1.5])
    return x, x @ w + 0.5 * torch.randn(N, generator=g)


def test_inclusion_probabilities_select_the_true_features():
    torch.set_num_threads(1)
    x, y = _sparse_regression()
    model = BayesianNet(nn.Linear(50, 1), likelihood="regression", noise_scale=0.5)
    kernel = SpikeSlabSGHMC(model, step_size=2e-4, friction=0.5, spike_scale=0.02, slab_scale=1.0,
                            steps_per_sample=2, subsample_size=100, inclusion_beta=(1.0, 1.0),
                            learn_slab_scale=True)
    MCMC(kernel, num_samples=400, warmup_steps=400, disable_progbar=True).run(x, y)
    rho = kernel.inclusion_probabilities()["weight"][0]
    assert (rho[:5] > 0.9).all(), rho[:5]
    assert (rho[5:] < 0.1).all(), rho[5:].max()


def test_pruning_reaches_target_sparsity_with_exact_zeros():
    torch.set_num_threads(1)
    x, y = _sparse_regression()
    model = BayesianNet(nn.Linear(50, 1), likelihood="regression", noise_scale=0.5)
    kernel = SpikeSlabSGHMC(model, step_size=2e-4, friction=0.5, spike_scale=0.02, target_sparsity=0.8,
                            inclusion_beta=(1.0, 1.0))
    mcmc = MCMC(kernel, num_samples=100, warmup_steps=200, disable_progbar=True)
    mcmc.run(x, y)
    w = mcmc.get_samples()["weight"][:, 0]
    zero = (w == 0).all(0)
    assert int(zero.sum()) == 40 and not (w[:, ~zero] == 0).any()
    assert not zero[:5].any()                    # the true features survive
    stats = mcmc.diagnostics()
    sparsity, rate = np.asarray(stats["sparsity"]["chain 0"]), np.asarray(stats["inclusion_rate"]["chain 0"])
    assert sparsity.shape == (100,) and (sparsity == 0.8).all()
    assert 0.1 <= rate[-1] <= 0.2


def test_neuron_groups_prune_whole_rows():
    torch.set_num_threads(1)
    x, y = _sparse_regression(P=10)
    net = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 1))
    model = BayesianNet(net, likelihood="regression", noise_scale=0.5)
    kernel = SpikeSlabSGHMC(model, step_size=1e-4, friction=0.5, group="neuron", target_sparsity=0.5,
                            sites=["0.weight"])
    mcmc = MCMC(kernel, num_samples=20, warmup_steps=40, disable_progbar=True)
    mcmc.run(x, y)
    w = mcmc.get_samples()["0.weight"]          # (S, 8, 10)
    rows_zero = (w == 0).all(-1).all(0)
    assert int(rows_zero.sum()) == 4 and not (w[:, ~rows_zero] == 0).all(-1).any()
    assert kernel.inclusion_probabilities()["0.weight"].shape == (8, 10)
