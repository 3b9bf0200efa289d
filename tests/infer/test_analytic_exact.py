"""AnalyticPredictive is exact for a linear model: f = W x + b with Gaussian [W, b] has
mean J m and covariance J Sigma J^T (J the Jacobian in the flat weights), for every guide."""

import math

import numpy as np
import pytest
import torch
from pyro.infer.autoguide import (AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoMultivariateNormal,
                                  AutoNormal)
from torch import nn

import pyro_subnet as ps
from pyro_subnet.infer.analytic import FlatGaussian, FlatPosterior


def _linear_model(likelihood="regression", num_out=3):
    torch.manual_seed(1)
    net = nn.Linear(4, num_out).double()
    return ps.nn.BayesianNet(net, likelihood=likelihood, noise_scale=0.3)


def _data(num_out=3):
    g = torch.Generator().manual_seed(2)
    return torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, num_out, generator=g, dtype=torch.float64)


def _jacobian(model, theta, x):
    return torch.func.jacrev(lambda t: model.network.flat(t, x))(theta)   # (N, O, D)


def _guide_covariance_in_layout_order(guide, model):
    """(mean, cov) of the guide in layout order, mapped by site name from the guide's own
    packing order (the insertion order of its unconstrained shapes)."""
    post = guide.get_posterior()
    if isinstance(guide, AutoDiagonalNormal):
        loc, cov = post.base_dist.loc, torch.diag(post.base_dist.scale ** 2)
    else:
        loc, cov = post.loc, post.covariance_matrix
    offsets, start = {}, 0
    for name, shape in guide._unconstrained_shapes.items():
        offsets[name] = torch.arange(start, start + math.prod(shape))
        start += math.prod(shape)
    perm = torch.cat([offsets[n] for n in model.layout.names])
    return loc[perm].detach(), cov[perm][:, perm].detach()


def _perturb(guide):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in guide.named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal,
                                       AutoLowRankMultivariateNormal])
def test_linear_model_is_exact(guide_cls):
    model = _linear_model()
    x, y = _data()
    guide = guide_cls(model)
    guide(x, y)
    _perturb(guide)
    if guide_cls is AutoNormal:
        names = model.layout.names
        m = model.layout.flatten({n: guide._get_loc_and_scale(n)[0] for n in names}).detach()
        cov = torch.diag(model.layout.flatten({n: guide._get_loc_and_scale(n)[1] for n in names}).detach() ** 2)
    else:
        m, cov = _guide_covariance_in_layout_order(guide, model)
    J = _jacobian(model, m, x)
    out = ps.infer.AnalyticPredictive(model, guide, covariance="full")(x)
    want_mean = model.network.flat(m, x)
    want_cov = J @ cov @ J.transpose(-1, -2)
    assert torch.allclose(out["f_mean"], want_mean, atol=1e-5, rtol=0)
    assert torch.allclose(out["f_cov"], want_cov, atol=1e-5, rtol=0)
    assert torch.allclose(out["var"], want_cov.diagonal(dim1=-2, dim2=-1) + 0.3 ** 2, atol=1e-5, rtol=0)
    # The diagonal mode is exact for the variances of a linear model too.
    diag = ps.infer.AnalyticPredictive(model, guide, covariance="diag")(x)
    assert torch.allclose(diag["f_var"], want_cov.diagonal(dim1=-2, dim2=-1), atol=1e-5, rtol=0)
    assert torch.allclose(diag["f_mean"], want_mean, atol=1e-5, rtol=0)


class _FakeSubnetGuide:
    """Stands in for AutoSubnetLaplace: the flat_gaussian() contract."""

    def __init__(self, mean, indices, scale_tril):
        self._g = FlatGaussian(mean, indices, scale_tril)

    def flat_gaussian(self):
        return self._g


def test_subnetwork_gaussian_is_exact():
    model = _linear_model(num_out=2)
    x, _ = _data(2)
    D = model.layout.dim
    g = torch.Generator().manual_seed(4)
    mean = torch.randn(D, generator=g, dtype=torch.float64)
    idx = torch.tensor([9, 0, 3, 8, 5])            # unsorted, across the weight and the bias site
    A = torch.randn(5, 5, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(A @ A.T + 0.1 * torch.eye(5, dtype=torch.float64))
    cov = torch.zeros(D, D, dtype=torch.float64)
    cov[idx[:, None], idx[None, :]] = L @ L.T
    J = _jacobian(model, mean, x)
    out = ps.infer.AnalyticPredictive(model, _FakeSubnetGuide(mean, idx, L), covariance="full")(x)
    assert torch.allclose(out["f_mean"], model.network.flat(mean, x), atol=1e-5, rtol=0)
    assert torch.allclose(out["f_cov"], J @ cov @ J.transpose(-1, -2), atol=1e-5, rtol=0)


def test_flat_posterior_low_rank_plus_diagonal_is_exact():
    model = _linear_model(num_out=2)
    x, _ = _data(2)
    D = model.layout.dim
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(D, generator=g, dtype=torch.float64)
    var = torch.rand(D, generator=g, dtype=torch.float64)
    F = torch.randn(D, 3, generator=g, dtype=torch.float64)
    post = FlatPosterior(mean, var, torch.arange(D), F)
    cov = torch.diag(var) + F @ F.T
    J = _jacobian(model, mean, x)
    out = ps.infer.AnalyticPredictive(model, post, covariance="full")(x)
    assert torch.allclose(out["f_cov"], J @ cov @ J.transpose(-1, -2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("subnetwork", [False, True])
def test_two_linear_layers_with_correlated_weights_are_exact(subnetwork):
    """f = W2 (W1 x + b1) + b2 is quadratic in the weights, so with a Gaussian posterior that
    correlates the layers (low-rank plus diagonal over all weights, or a subnetwork) its moments
    are known in closed form: with theta = m + z, z ~ N(0, C), f_k = f_k(m) + g_k^T z + z^T H_k z / 2,
    E f_k = f_k(m) + tr(H_k C) / 2, Cov(f_k, f_l) = g_k^T C g_l + tr(H_k C H_l C) / 2. The first-order
    terms alone miss the last one: the products of correlated weights with a correlated input."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.Identity(), nn.Linear(4, 2)).double()
    model = ps.nn.BayesianNet(net, likelihood="regression", noise_scale=0.3)
    D = model.layout.dim
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    mean = torch.randn(D, generator=g, dtype=torch.float64)
    if subnetwork:
        idx = torch.randperm(D, generator=g)[:9]
        var, F = torch.zeros(D, dtype=torch.float64), 0.5 * torch.randn(9, 9, generator=g, dtype=torch.float64)
    else:
        idx = torch.arange(D)
        var, F = 0.3 * torch.rand(D, generator=g, dtype=torch.float64), 0.4 * torch.randn(D, 3, generator=g, dtype=torch.float64)
    C = torch.diag(var)
    C[idx[:, None], idx[None, :]] += F @ F.T
    f = lambda t: model.network.flat(t, x)  # noqa: E731
    grad = torch.func.jacrev(f)(mean)                                       # (N, O, D)
    H = torch.func.jacfwd(torch.func.jacrev(f))(mean)                       # (N, O, D, D)
    want_mean = f(mean) + 0.5 * torch.einsum("nkij,ji->nk", H, C)
    HC = H @ C
    want_cov = grad @ C @ grad.transpose(-1, -2) + 0.5 * torch.einsum("nkij,nlji->nkl", HC, HC)
    out = ps.infer.AnalyticPredictive(model, FlatPosterior(mean, var, idx, F), covariance="full")(x)
    assert torch.allclose(out["f_mean"], want_mean, atol=1e-10, rtol=0)
    assert torch.allclose(out["f_cov"], want_cov, atol=1e-10, rtol=0)
    first_order = grad @ C @ grad.transpose(-1, -2)
    assert (out["f_cov"] - first_order).abs().max() > 1e-2            # the product terms matter here
    if not subnetwork:
        return
    # without them (and with no independent variances, as in a Laplace subnetwork): the network
    # linearised in the weights, i.e. the GLM predictive, also exactly
    for kw in (dict(activations="linearise"), dict(products=False)):
        glm = ps.infer.AnalyticPredictive(model, FlatPosterior(mean, var, idx, F), covariance="full", **kw)(x)
        assert torch.allclose(glm["f_mean"], f(mean), atol=1e-10, rtol=0)
        assert torch.allclose(glm["f_cov"], first_order, atol=1e-10, rtol=0)


def test_classification_probit_link():
    model = _linear_model("classification", num_out=3)
    x, _ = _data()
    D = model.layout.dim
    mean = torch.randn(D, dtype=torch.float64)
    var = torch.full((D,), 0.2, dtype=torch.float64)
    out = ps.infer.AnalyticPredictive(model, FlatPosterior(mean, var), link="probit")(x)
    f = model.network.flat(mean, x)
    v = ((x ** 2).sum(-1, keepdim=True) + 1) * 0.2          # sum_i x_i^2 Var(W_ki) + Var(b_k)
    want = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * v), -1)
    assert torch.allclose(out["probs"], want, atol=1e-10)
    assert torch.allclose(out["probs"].sum(-1), torch.ones(6, dtype=torch.float64))


def test_errors_name_the_problem():
    net = nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=-1))
    model = ps.nn.BayesianNet(net, likelihood="regression")
    post = FlatPosterior(torch.zeros(model.layout.dim), torch.ones(model.layout.dim))
    with pytest.raises(NotImplementedError, match="Softmax"):
        ps.infer.AnalyticPredictive(model, post)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="not set up"):
        ps.infer.AnalyticPredictive(model, AutoNormal(model))(torch.randn(2, 3))
    with pytest.raises(ValueError, match="shape"):
        ps.infer.AnalyticPredictive(model, FlatPosterior(torch.zeros(3), torch.ones(3)))(torch.randn(2, 3))
    with pytest.raises(ValueError, match="covariance"):
        ps.infer.AnalyticPredictive(model, post, covariance="dense")
    with pytest.raises(ValueError, match="products"):
        ps.infer.AnalyticPredictive(model, post, products="yes")


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoMultivariateNormal])
def test_cached_posterior_follows_guide_updates(guide_cls):
    """Repeated calls reuse what depends on the posterior only, until a guide tensor changes."""
    model = _linear_model()
    x, y = _data()
    guide = guide_cls(model)
    guide(x, y)
    pred = ps.infer.AnalyticPredictive(model, guide, covariance="full")
    first = pred(x)["f_cov"]
    assert pred._site_posterior(x)[0] is pred._site_posterior(x)[0]
    _perturb(guide)                                   # in place, as an optimiser step
    after = pred(x)["f_cov"]
    fresh = ps.infer.AnalyticPredictive(model, guide, covariance="full")(x)["f_cov"]
    assert not torch.allclose(first, after)
    assert torch.allclose(after, fresh, atol=1e-12)


def test_auto_batch_size_chunks_correlated_passes_without_changing_them(monkeypatch):
    """batch_size="auto" (CPU, a factor of width r): passes of AUTO_BATCH_ELEMENTS // (r * widest
    layer) examples, at least 16, with the same predictive as one pass; no factor: one pass."""
    from pyro_subnet.infer.analytic import predictive
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 2)).double()
    model = ps.nn.BayesianNet(net, likelihood="classification")
    D, r = model.layout.dim, 8
    g = torch.Generator().manual_seed(7)
    post = FlatPosterior(0.3 * torch.randn(D, generator=g, dtype=torch.float64), torch.zeros(D, dtype=torch.float64),
                         torch.arange(D), 0.05 * torch.randn(D, r, generator=g, dtype=torch.float64))
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    monkeypatch.setattr(predictive, "AUTO_BATCH_ELEMENTS", 20 * r * 64)
    auto, whole = (ps.infer.AnalyticPredictive(model, post, batch_size=b) for b in ("auto", None))
    auto.prepare(x)
    assert auto._batch_rows(auto._site_posterior(x)[0], x) == 20
    monkeypatch.setattr(predictive, "AUTO_BATCH_ELEMENTS", 1)
    auto = ps.infer.AnalyticPredictive(model, post)
    auto.prepare(x)
    assert auto._batch_rows(auto._site_posterior(x)[0], x) == 16
    calls = []
    monkeypatch.setattr(predictive.layers, "propagate",             # count the passes over the whole network
                        lambda m, *a, _p=predictive.layers.propagate: calls.append(m is model.network.module) or _p(m, *a))
    a, w = auto(x), whole(x)
    assert sum(calls) == 4                            # 16 + 16 + 8 examples, then one pass
    for k in ("f_mean", "f_cov", "probs"):
        torch.testing.assert_close(a[k], w[k], rtol=0, atol=1e-12)
    independent = FlatPosterior(post.mean, torch.full((D,), 0.01, dtype=torch.float64))
    pred = ps.infer.AnalyticPredictive(model, independent)
    pred.prepare(x)
    assert pred._batch_rows(pred._site_posterior(x)[0], x) == 40
    for bad in (0, "all", True, 2.5, torch.ones(2)):
        with pytest.raises(ValueError, match="batch_size"):
            ps.infer.AnalyticPredictive(model, post, batch_size=bad)
    assert ps.infer.AnalyticPredictive(model, post, batch_size=np.int64(8)).batch_size == 8
    with pytest.raises(ValueError, match="at least one example"):
        auto(x[:0])


def test_widest_activation_traces_shapes_on_one_example():
    """The "auto" batch size's F: the largest module output of one example, inner layers included."""
    from pyro_subnet.infer.analytic.predictive import widest_activation
    mlp = nn.Sequential(nn.Linear(784, 50), nn.Tanh(), nn.Linear(50, 10))
    conv = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, 3))
    block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    transformer = nn.Sequential(nn.Unflatten(1, (8, 8)), nn.Linear(8, 16), block, nn.Flatten(), nn.Linear(128, 10))
    assert widest_activation(mlp, (784,), torch.float64) == 50           # not the input
    assert widest_activation(conv, (64,), torch.float32) == 4 * 8 * 8    # channels x pixels
    assert widest_activation(transformer.eval(), (64,), torch.float32) == 8 * 32   # tokens x feed-forward width
    assert widest_activation(mlp, (3,), torch.float32) is None           # a shape the network cannot take
    # the pass leaves nothing changed: the modules' modes, the random stream, the fused attention path
    transformer.train()
    state = torch.get_rng_state()
    assert widest_activation(transformer, (64,), torch.float64) == 8 * 32
    assert all(m.training for m in transformer.modules()) and torch.equal(state, torch.get_rng_state())
    assert torch.backends.mha.get_fastpath_enabled()
