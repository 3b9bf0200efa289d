"""Subnetwork selection strategies against direct computations."""

import math

import pytest
import torch
from torch import nn
from torch.func import jacrev

import pyro_subnet as ps
from pyro_subnet.infer import curvature
from pyro_subnet.subnet import make_probes


def problem(seed=0, n=40):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    model = ps.nn.BayesianNet(net, likelihood="regression", noise_scale=0.2)
    x = torch.randn(n, 2, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.1 * x[:, 1]
    theta = model.initial_theta(dtype=torch.float64)
    return model, theta, x, y


def full_jacobian(model, theta, x):
    return jacrev(lambda t: model.network.flat(t, x))(theta)   # (N, O, D), the textbook way


@pytest.mark.parametrize("strategy", [
    ps.subnet.LargestMagnitude(7), ps.subnet.Random(7, seed=3), ps.subnet.LargestVariance(7, method="diag_laplace"),
    ps.subnet.LargestVariance(7, method="swag", num_snapshots=5), ps.subnet.PredictiveVariance(7, num_probes=16),
])
def test_strategies_return_k_distinct_sorted_indices(strategy):
    model, theta, x, y = problem()
    idx = strategy.select(model, theta, (x, y))
    assert idx.dtype == torch.long and idx.numel() == 7 and torch.unique(idx).numel() == 7
    assert torch.equal(idx, idx.sort().values) and 0 <= idx.min() and idx.max() < model.layout.dim


def test_diag_laplace_variance_picks_largest_direct_variances():
    model, theta, x, y = problem()
    J = full_jacobian(model, theta, x)[:, 0, :]                       # (N, D)
    direct = 1.0 / ((J ** 2).sum(0) / 0.2 ** 2 + model.prior_precision(dtype=torch.float64))
    idx = ps.subnet.LargestVariance(9, method="diag_laplace").select(model, theta, (x, y))
    assert set(idx.tolist()) == set(torch.topk(direct, 9).indices.tolist())
    assert torch.equal(ps.subnet.LargestMagnitude(9).select(model, theta, (x, y)),
                       torch.topk(theta.abs(), 9).indices.sort().values)


def test_predictive_variance_greedy_matches_dense_greedy():
    model, theta, x, y = problem()
    k, num_probes = 6, 12
    idx = ps.subnet.PredictiveVariance(k, num_probes=num_probes, block=1, pool_size=model.layout.dim, overshoot=0, seed=0,
                                       num_data=1000).select(model, theta, (x, y))
    # Dense reference: greedy maximisation of sum_z J_S(z) H_SS^{-1} J_S(z)^T.
    probes = make_probes(x, num_probes, torch.Generator().manual_seed(0))
    Jz = full_jacobian(model, theta, probes)[:, 0, :]
    Jx = full_jacobian(model, theta, x)[:, 0, :]
    H = Jx.T @ Jx / 0.2 ** 2 + torch.diag(model.prior_precision(dtype=torch.float64))
    chosen = []
    for _ in range(k):
        best, best_c = -1.0, None
        for c in range(model.layout.dim):
            if c in chosen:
                continue
            S = chosen + [c]
            val = torch.trace(torch.linalg.solve(H[S][:, S], Jz[:, S].T @ Jz[:, S]))
            if val > best:
                best, best_c = val, c
        chosen.append(best_c)
    assert sorted(chosen) == idx.tolist()


def test_site_strategies_memory_budget_and_normalisation_exclusion():
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2))
    model = ps.nn.BayesianNet(net, likelihood="classification")
    theta = model.initial_theta()
    layout = model.layout
    norm = set(layout.site_index_ranges(["1.weight", "1.bias"]).tolist())
    everything = ps.subnet.All().select(model, theta)
    assert everything.numel() == layout.dim - 8 and not norm & set(everything.tolist())
    with_norm = ps.subnet.All(exclude_normalisation=False).select(model, theta)
    assert with_norm.numel() == layout.dim
    assert ps.subnet.LastLayer().select(model, theta).tolist() == layout.site_index_ranges(["3.weight", "3.bias"]).tolist()
    assert ps.subnet.ByName("*.bias").select(model, theta).tolist() == layout.site_index_ranges(["0.bias", "3.bias"]).tolist()
    mag = ps.subnet.LargestMagnitude(20).select(model, theta)
    assert not norm & set(mag.tolist())
    # "1MB" of float32 for 3 dense k x k matrices: k = floor(sqrt(1e6 / 12)) = 288.
    assert ps.subnet.k_from_memory("1MB") == 288
    assert ps.subnet.parse_memory("200MB") == 200_000_000 and ps.subnet.parse_memory("1KiB") == 1024
    assert ps.subnet.Random(max_memory="200B").select(model, theta).numel() == math.isqrt(200 // 12)
    with pytest.raises(ValueError, match="exceeds"):
        ps.subnet.Random(1000).select(model, theta)
    with pytest.raises(ValueError, match="cannot read"):
        ps.subnet.parse_memory("lots")


def test_diag_laplace_selection_of_inert_weights_warns():
    # Hidden unit 0 has a zero outgoing weight: its input weights have zero GGN and the largest
    # diagonal-Laplace variance, which is the failure the issue describes.
    net = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1))
    with torch.no_grad():
        net[2].weight[0, 0] = 0.0
    model = ps.nn.BayesianNet(net, likelihood="regression")
    x = torch.linspace(-1, 1, 20)[:, None]
    y = x[:, 0]
    idx = ps.subnet.LargestVariance(2, method="diag_laplace").select(model, model.initial_theta(), (x, y))
    assert idx.tolist() == [0, 3]       # "0.weight"[0, 0] and "0.bias"[0]
    with pytest.warns(RuntimeWarning, match="nearly zero"):
        ps.infer.AutoSubnetLaplace(model, subnet=ps.subnet.LargestVariance(2, method="diag_laplace"), map_steps=0,
                                   progress=False).fit(x, y)


def test_linear_fast_jacobian_equals_autodiff():
    model, theta, x, y = problem()
    idx = torch.tensor([0, 5, 13, 20, 40, model.layout.dim - 1])
    f, J = curvature.jacobian(model.network, theta, x, idx)
    ref = full_jacobian(model, theta, x)[..., idx]
    assert torch.allclose(J, ref, atol=1e-12)
