"""AnalyticPredictive's defaults: the unformed factor equals the full covariance, ``covariance="auto"``
keeps the full covariance exactly where it changes the predictive by more than its tolerance, the
quasi-Monte Carlo link converges to the Gaussian integral, and the sample-based Laplace guide is read."""


import pytest
import torch
from torch import nn

import pyro_subnet as ps
from pyro_subnet.infer import links
from pyro_subnet.infer.analytic import FlatPosterior, gaussian_activation, layers
from pyro_subnet.infer.analytic.posterior import SitePosterior

X = torch.randn(40, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _mlp(hidden=(16, 16), out=3, seed=1):
    torch.manual_seed(seed)
    mods, d = [], 3
    for h in hidden:
        mods += [nn.Linear(d, h), nn.Tanh()]
        d = h
    return nn.Sequential(*mods, nn.Linear(d, out)).double()


def _independent(model, scale, gain=5.0):
    """Independent weights of sd ``scale`` around a prior draw scaled by ``gain`` (large mean
    weights: they correlate the units of an example)."""
    theta = gain * model.initial_theta(dtype=torch.float64)
    return FlatPosterior(theta, torch.full_like(theta, scale ** 2))


@pytest.mark.parametrize("hidden", [(16, 16), (16, 12, 8)])
def test_unformed_factor_is_the_full_covariance(hidden):
    """Independent weights: the full covariance carried as lifted columns of A (unformed, then
    formed where A grows as wide as the features) equals the covariance-matrix path."""
    model = ps.nn.BayesianNet(_mlp(hidden), likelihood="classification")
    post = _independent(model, 0.3)
    net, prefix = model.network.module, layers.output_linear(model.network.module)
    outs = {}
    for lift in (True, False):
        site = SitePosterior(post, model.layout, torch.float64, "cpu", full=True, full_output_at=prefix)
        assert site.lift
        site.lift = lift
        outs[lift] = layers.propagate(net, gaussian_activation.Gaussian(X, None), site)
    assert torch.allclose(outs[True].mean, outs[False].mean, atol=1e-12)
    assert torch.allclose(outs[True].total_cov(), outs[False].total_cov(), atol=1e-12)


def test_scaled_factor_operations_match_the_formed_tensor():
    g = torch.Generator().manual_seed(0)
    M, rows, cols = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 4), (7, 5), (7, 4)))
    A = gaussian_activation.ScaledFactor(rows, M, cols, (M ** 2).T)
    dense = A.dense()
    assert dense.shape == A.shape == (7, 5, 4)
    J, W = torch.rand(7, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(gaussian_activation._sq_norm(A), (dense ** 2).sum(-1))
    assert torch.allclose(gaussian_activation._scale_rows(J, A).dense(), J.unsqueeze(-1) * dense)
    assert torch.allclose(gaussian_activation._left_matmul(W, A), W @ dense)


def _kl(p, q):
    return float((p * (p.log() - q.log())).sum(-1).mean())


def _utility_kl(p, q):
    """An independent KL of the contrasts u_k - u_C of u = f + N(0, pi^2/6 I) (torch's own MVN KL)."""
    C = p["f_mean"].shape[-1]
    D = torch.cat([torch.eye(C - 1), -torch.ones(C - 1, 1)], 1).double()

    def utilities(out):
        cov = out.get("f_cov", None)
        cov = torch.diag_embed(out["f_var"]) if cov is None else cov
        cov = cov.double() + torch.pi ** 2 / 6 * torch.eye(C, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(out["f_mean"].double() @ D.T, D @ cov @ D.T)
    return float(torch.distributions.kl_divergence(utilities(p), utilities(q)).mean())


def test_auto_covariance_keeps_the_full_one_only_above_the_tolerance():
    """The choice follows the measured change: for a classifier the mean KL divergence of the
    diagonal representation's Gaussian utilities from the full one's on the probe rows (recomputed
    here from the two explicit predictors), an upper bound of the change in the predictive."""
    model = ps.nn.BayesianNet(_mlp(), likelihood="classification")
    probe = X[:ps.infer.analytic.predictive.PROBE_ROWS]
    for scale in (0.02, 0.3):
        post = _independent(model, scale)
        full = ps.infer.AnalyticPredictive(model, post, covariance="full")(probe)
        diag = ps.infer.AnalyticPredictive(model, post, covariance="diag")(probe)
        change = _utility_kl(full, diag)
        assert change >= _kl(full["probs"], diag["probs"])      # the bound holds for the link's output
        for tolerance in (0.5 * change, 2 * change):
            pred = ps.infer.AnalyticPredictive(model, post, covariance_tolerance=tolerance)
            out = pred(X)["probs"]
            assert pred.covariance_change == pytest.approx(change, rel=1e-6)
            assert pred.full == (change > tolerance)
            explicit = ps.infer.AnalyticPredictive(model, post, covariance="full" if pred.full else "diag")(X)
            assert torch.allclose(out, explicit["probs"], atol=1e-12)
    # a narrow posterior barely correlates the units: the default tolerance keeps the diagonal
    narrow = ps.infer.AnalyticPredictive(model, _independent(model, 0.005))
    narrow(X)
    assert narrow.covariance_change < ps.infer.analytic.predictive.COVARIANCE_TOLERANCE and not narrow.full


def test_auto_covariance_is_diagonal_where_the_two_cannot_differ():
    """One hidden layer: the first layer on the data is exactly diagonal and the output layer keeps
    its covariance, so the two representations are equal and nothing is weighed."""
    model = ps.nn.BayesianNet(_mlp(hidden=(16,)), likelihood="classification")
    post = _independent(model, 0.5)
    pred = ps.infer.AnalyticPredictive(model, post)
    out = pred(X)["probs"]
    assert not pred.full and pred.covariance_change is None
    full = ps.infer.AnalyticPredictive(model, post, covariance="full")(X)["probs"]
    assert torch.allclose(out, full, atol=1e-12)


def test_auto_covariance_is_chosen_again_when_the_posterior_changes():
    model = ps.nn.BayesianNet(_mlp(), likelihood="classification")
    post = _independent(model, 0.005)
    pred = ps.infer.AnalyticPredictive(model, post, covariance_tolerance=1e-7)
    pred(X)
    assert not pred.full
    post.var.fill_(0.3 ** 2)          # in place: the predictor sees the new version and weighs again
    pred(X)
    assert pred.full and pred.covariance_change > 1e-7


def test_regression_change_is_the_gaussian_kl():
    model = ps.nn.BayesianNet(_mlp(out=1), likelihood="regression", noise_scale=0.1)
    post = _independent(model, 0.4)
    probe = X[:ps.infer.analytic.predictive.PROBE_ROWS]
    f = ps.infer.AnalyticPredictive(model, post, covariance="full")(probe)
    d = ps.infer.AnalyticPredictive(model, post, covariance="diag")(probe)
    kl = 0.5 * (f["var"] / d["var"] - 1 - torch.log(f["var"] / d["var"]) + (f["mean"] - d["mean"]) ** 2 / d["var"])
    pred = ps.infer.AnalyticPredictive(model, post)
    pred(X)
    assert pred.covariance_change == pytest.approx(float(kl.mean()), rel=1e-6)


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_sobol_link_converges_to_the_gaussian_integral(scale):
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(200, 5, generator=g, dtype=torch.float64)
    B = torch.randn(200, 5, 5, generator=g, dtype=torch.float64)
    cov = scale ** 2 * (B @ B.transpose(-1, -2) / 5 + 0.1 * torch.eye(5, dtype=torch.float64))
    z = torch.randn(100000, 1, 5, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    L = torch.linalg.cholesky(cov)
    reference = torch.softmax(mean + (L @ z).squeeze(-1), -1).mean(0)
    errors = {S: float((links.sobol_softmax(mean, cov, S) - reference).abs().mean()) for S in (16, 128, 1024)}
    assert errors[1024] < errors[128] < errors[16]
    assert errors[128] < 0.006
    # Gumbel-max, the closed form, is further from the integral than the default rule
    assert errors[128] < float((links.gumbel_max_softmax(mean, cov) - reference).abs().mean())
    p = links.sobol_softmax(mean, cov)
    assert torch.allclose(p.sum(-1), torch.ones(200, dtype=torch.float64))
    # variances only: the same rule with a diagonal factor
    diag = torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1))
    assert torch.allclose(links.sobol_softmax(mean, cov.diagonal(dim1=-2, dim2=-1)), links.sobol_softmax(mean, diag))


def test_sobol_link_of_a_point_posterior_is_the_softmax_and_bad_input_is_named():
    mean = torch.randn(6, 4, dtype=torch.float64)
    assert torch.allclose(links.sobol_softmax(mean, torch.zeros(6, 4, 4, dtype=torch.float64)),
                          torch.softmax(mean, -1), atol=1e-12)
    with pytest.raises(ValueError, match="cov"):
        links.sobol_softmax(mean, torch.zeros(6, 3))
    with pytest.raises(ValueError, match="covariance_tolerance"):
        ps.infer.AnalyticPredictive(ps.nn.BayesianNet(_mlp(), "classification"), None, covariance_tolerance=-1)


def test_sampled_laplace_is_read_as_its_samples_covariance():
    """A single linear layer: the analytic predictive of AutoSampledLaplace is exactly
    J (Z^T Z / K) J^T around the guide's centre (Z its samples)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5, 0.3, 0.0], dtype=torch.float64) + 0.3 * torch.randn(50, generator=g,
                                                                                         dtype=torch.float64)
    model = ps.nn.BayesianNet(nn.Linear(4, 1).double(), "regression", noise_scale=0.3)
    guide = ps.infer.AutoSampledLaplace(model, num_posterior_samples=32, map_steps=300, progress=False).fit(x, y)
    out = ps.infer.AnalyticPredictive(model, guide)(x[:7])
    Z = guide.samples
    cov = torch.zeros(model.layout.dim, model.layout.dim, dtype=torch.float64)
    idx = guide.subnet_indices
    cov[idx[:, None], idx[None]] = Z.T @ Z / Z.shape[0]
    J = torch.func.jacrev(lambda t: model.network.flat(t, x[:7]))(guide.loc)[:, 0]      # (7, D)
    assert torch.allclose(out["mean"], model.network.flat(guide.loc, x[:7])[:, 0], atol=1e-10)
    assert torch.allclose(out["var"], (J @ cov * J).sum(-1) + 0.3 ** 2, atol=1e-10)


def test_laplace_guides_default_to_their_linearised_predictive():
    """A Laplace posterior is that of the network linearised at the MAP; by default the analytic
    predictive of such a guide is its GLM predictive, the one its own Predictive draws from."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] - x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    model = ps.nn.BayesianNet(_mlp(hidden=(16,)), "classification")
    guide = ps.infer.AutoSampledLaplace(model, num_posterior_samples=64, map_steps=300, progress=False).fit(x, y)
    pred = ps.infer.AnalyticPredictive(model, guide)
    assert pred.activations == "linearise"
    mean, cov = pred.latent(x)
    # the guide's GLM, f(x; MAP) and F = J Z^T / sqrt(K), is in the normalised logits log softmax(f)
    # that the Categorical holds; they are the raw logits shifted by a common constant, which
    # softmax ignores: to first order P (f - f_MAP) with P = I - 1 p^T, p = softmax(f_MAP)
    f, F = guide._function_factor(x)
    assert torch.allclose(torch.log_softmax(mean, -1), f, atol=1e-10)
    p = torch.softmax(mean, -1)
    P = torch.eye(3, dtype=p.dtype) - torch.ones(3, 1, dtype=p.dtype) * p.unsqueeze(-2)      # [n, i, j] = d_ij - p_nj
    assert torch.allclose(P @ cov @ P.transpose(-1, -2), F @ F.transpose(-1, -2), atol=1e-10)
    # linearised, the logits are exactly Gaussian: the default link integrates that Gaussian, and
    # is nearer the integral (200k draws of the guide's GLM logits) than the closed form
    assert pred.link == "sobol"
    draws = torch.randn(200000, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reference = sum(torch.softmax(f + torch.einsum("nok,sk->sno", F, z), -1).sum(0)
                    for z in draws.split(10000)) / draws.shape[0]
    errors = {link: float((ps.infer.AnalyticPredictive(model, guide, link=link)(x)["probs"] - reference).abs().max())
              for link in ("sobol", "gumbel_max")}
    assert errors["sobol"] < 0.005
    assert errors["sobol"] < errors["gumbel_max"]
    nn_pred = ps.infer.AnalyticPredictive(model, guide, activations="moments")
    assert nn_pred.activations == "moments" and nn_pred.link == "gumbel_max"


@pytest.mark.parametrize("hidden", [(16,), (16, 12)])
def test_diagonal_laplace_is_its_glm_predictive(hidden):
    """Independent weights with linearised activations and no products of weight and input noise:
    exactly the network linearised in the weights, f(x; MAP) and J diag(v) J^T (J by jacrev)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(60, 1, generator=g, dtype=torch.float64)
    model = ps.nn.BayesianNet(_mlp(hidden, out=1), "regression", noise_scale=0.1)
    guide = ps.infer.AutoDiagonalLaplace(model, map_steps=200, progress=False).fit(x, y)
    pred = ps.infer.AnalyticPredictive(model, guide)
    assert pred.activations == "linearise"
    out = pred(x[:9])
    post = guide.flat_posterior()
    J = torch.func.jacrev(lambda t: model.network.flat(t, x[:9]))(post.mean)[:, 0]      # (9, D)
    assert torch.allclose(out["mean"], model.network.flat(post.mean, x[:9])[:, 0], atol=1e-10)
    assert torch.allclose(out["var"], (J ** 2 * post.var).sum(-1) + 0.1 ** 2, rtol=1e-8, atol=1e-12)


def test_the_predictor_applies_the_chosen_link_to_its_latent_moments():
    model = ps.nn.BayesianNet(_mlp(), likelihood="classification")
    post = _independent(model, 0.3)
    for link, fn in (("sobol", links.sobol_softmax), ("gumbel_max", links.gumbel_max_softmax)):
        pred = ps.infer.AnalyticPredictive(model, post, link=link)
        mean, cov = pred.latent(X)
        assert torch.allclose(pred(X)["probs"], fn(mean, cov), atol=1e-12)
    assert ps.infer.AnalyticPredictive(model, post).link == "gumbel_max"
