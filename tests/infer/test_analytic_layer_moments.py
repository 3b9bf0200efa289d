"""Moment-matched activations and the Gumbel-max link of AnalyticPredictive against Monte Carlo."""

import pytest
import torch

from pyro_subnet.infer import links
from pyro_subnet.infer.analytic import gaussian_activation, linear_moments, nonlinear_moments, norm_attention_moments


def _gaussian(N=200, F=6, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = scale * torch.randn(N, F, generator=g, dtype=torch.float64)
    L = torch.randn(N, F, F, generator=g, dtype=torch.float64) * scale / F ** 0.5
    return mean, L @ L.transpose(-1, -2) + 0.1 * torch.eye(F, dtype=torch.float64)


@pytest.mark.parametrize("fn", [torch.nn.ReLU(), torch.nn.Tanh(), torch.nn.Sigmoid(), torch.nn.GELU()])
def test_elementwise_moments_match_monte_carlo(fn):
    # unit standard deviations up to about 2 (the quadrature is exact to ~1e-3 there; wider units
    # are good to a few per cent, see _quadrature_moments)
    mean, cov = _gaussian(N=40, scale=1.0)
    x = gaussian_activation.Gaussian(mean, cov)
    out = nonlinear_moments.elementwise_moments(fn, x, num_nodes=16)
    z = torch.randn(50000, *mean.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = mean + torch.einsum("nkl,snl->snk", torch.linalg.cholesky(cov), z)
    y = fn(h)
    m, d = y.mean(0), y - y.mean(0)
    c = torch.einsum("snk,snl->nkl", d, d) / (len(y) - 1)
    sd = c.diagonal(dim1=-2, dim2=-1).sqrt()
    # mean and variance are exact per unit; covariances between units are first order (Stein)
    assert ((out.mean - m).abs() / (sd / len(y) ** 0.5 + 1e-6)).max() < 5
    v_mc, v_a = c.diagonal(dim1=-2, dim2=-1), out.var.diagonal(dim1=-2, dim2=-1)
    se_v = (d ** 2).std(0) / len(y) ** 0.5                  # standard error of the MC variances
    assert ((v_a - v_mc).abs() / (se_v + 1e-6)).max() < 5
    corr = lambda cv: cv / (cv.diagonal(dim1=-2, dim2=-1).sqrt().unsqueeze(-1) * cv.diagonal(dim1=-2, dim2=-1).sqrt().unsqueeze(-2) + 1e-12)  # noqa: E731
    assert (corr(out.var) - corr(c)).abs().mean() < 0.05


@pytest.mark.parametrize("fn", [torch.nn.Tanh(), torch.nn.Sigmoid()])
def test_default_saturating_moments_are_close(fn):
    """The default for tanh/sigmoid (probit fit, remainder only for narrow units) against 16 nodes."""
    mean = torch.linspace(-4, 4, 41, dtype=torch.float64)[:, None].expand(41, 6)
    var = torch.tensor([0.01, 0.1, 1.0, 4.0, 25.0, 400.0], dtype=torch.float64).expand(41, 6)
    a = nonlinear_moments.elementwise_moments(fn, gaussian_activation.Gaussian(mean, var))
    b = nonlinear_moments.elementwise_moments(fn, gaussian_activation.Gaussian(mean, var), num_nodes=16)
    assert (a.mean - b.mean).abs().max() < 0.02
    big = b.var > 1e-2 * b.var.max()
    assert ((a.var - b.var).abs() / b.var)[big].max() < 0.1


def test_relu_moments_closed_form():
    # the rectified Gaussian: mean s/sqrt(2 pi), E[relu^2] = s^2 / 2 at mu = 0
    x = gaussian_activation.Gaussian(torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), 4.0, dtype=torch.float64))
    out = nonlinear_moments.elementwise_moments(torch.nn.ReLU(), x)
    m = 2.0 / (2 * torch.pi) ** 0.5
    assert torch.allclose(out.mean, torch.tensor([[m]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(out.var, torch.tensor([[2.0 - m * m]], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_gumbel_max_softmax_matches_gaussian_integral(scale):
    mean, cov = _gaussian(N=300, F=5, scale=scale, seed=2)
    p = links.gumbel_max_softmax(mean, cov)
    assert torch.allclose(p.sum(-1), torch.ones(300, dtype=torch.float64))
    z = torch.randn(40000, *mean.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mc = torch.softmax(mean + torch.einsum("nkl,snl->snk", torch.linalg.cholesky(cov), z), -1).mean(0)
    probit = links.probit(mean, cov.diagonal(dim1=-2, dim2=-1))
    nll = lambda q: -torch.log(q).mean()  # noqa: E731  (expected NLL of every class as a proxy)
    err, err_probit = (p - mc).abs().mean(), (probit - mc).abs().mean()
    assert err < 0.02
    assert abs(nll(p) / nll(mc) - 1) < 0.03
    if scale > 1:     # where the variances are large, the Gumbel-max link beats the probit link
        assert err < err_probit


def _clark_reference(a, b, Sigma):
    """max(a, b) for a, b given as (mean, second moment, weights w over the utilities; the
    covariance of two of them is w_a Sigma w_b^T by Clark's linear rule): his formulas written plainly."""
    (ma, sa, wa), (mb, sb, wb) = a, b
    cov = lambda x, y: torch.einsum("ni,nij,nj->n", x, Sigma, y)  # noqa: E731
    theta = (sa - ma ** 2 + sb - mb ** 2 - 2 * cov(wa, wb)).sqrt()
    alpha = (ma - mb) / theta
    P = torch.distributions.Normal(0.0, 1.0).cdf(alpha)
    tp = theta * torch.exp(-alpha ** 2 / 2) / (2 * torch.pi) ** 0.5
    return P * ma + (1 - P) * mb + tp, P * sa + (1 - P) * sb + (ma + mb) * tp, P[:, None] * wa + (1 - P[:, None]) * wb


@pytest.mark.parametrize("C", [2, 3, 6])
def test_win_probabilities_match_plain_leave_one_out_maxima(C):
    """The prefix/suffix scan with its running covariances and weights equals the same merges
    written plainly (every maximum carried as weights over the utilities): max of u_0..u_{k-1},
    max of u_{k+1}..u_{C-1} (merged from the right), then the two; also for the independent
    utilities that share the pass."""
    mean, cov = _gaussian(N=30, F=C, scale=1.5, seed=11)
    N = mean.shape[0]
    eye = torch.eye(C, dtype=torch.float64)
    unit = lambda j: (mean[:, j], mean[:, j] ** 2 + cov[:, j, j], eye[j].expand(N, C))  # noqa: E731
    p = []
    for k in range(C):
        before = after = None
        for j in range(k):
            before = unit(j) if before is None else _clark_reference(before, unit(j), cov)
        for j in reversed(range(k + 1, C)):
            after = unit(j) if after is None else _clark_reference(after, unit(j), cov)
        m, s, w = before if after is None else after if before is None else _clark_reference(before, after, cov)
        var_diff = cov[:, k, k] + (s - m ** 2) - 2 * torch.einsum("nj,nj->n", w, cov[:, :, k])
        p.append(torch.distributions.Normal(0.0, 1.0).cdf((mean[:, k] - m) / var_diff.sqrt()))
    p = torch.stack(p, -1)
    p = p / p.sum(-1, keepdim=True)
    independent = 0.5 + torch.rand(N, C, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    got, got_independent = links._win_probabilities(mean, cov, independent=independent)
    assert torch.allclose(got, p, atol=1e-12)
    assert torch.allclose(links._win_probabilities(mean, cov), p, atol=1e-12)
    assert torch.allclose(got_independent, links._win_probabilities(mean, torch.diag_embed(independent)), atol=1e-12)


def test_product_covariance_matches_the_quadratic_forms():
    """Cov(q_k, q_l) for q_k = eps^T B_k eps, B_k = sum_i G_ki^T A_i: tr(B_k B_l^T) + tr(B_k B_l),
    from explicit B_k; full and diagonal outputs, with leading batch dimensions (tokens)."""
    g = torch.Generator().manual_seed(13)
    out, n_in, r = 3, 5, 4
    G = torch.zeros(out, n_in + 1, r, dtype=torch.float64)
    G[[0, 0, 1, 2, 2], [1, 3, 3, 0, 4]] = torch.randn(5, r, generator=g, dtype=torch.float64)
    A = torch.randn(2, 3, n_in, r, generator=g, dtype=torch.float64)           # (N, T, in, r)
    lw = linear_moments.prepare_linear(torch.zeros(out, n_in, dtype=torch.float64), None, None, G, products=True)
    used = A[..., lw.factor_inputs, :]
    B = torch.einsum("kir,ntis->ntkrs", G[:, :-1], A)
    want = (torch.einsum("ntkrs,ntlrs->ntkl", B, B) + torch.einsum("ntkrs,ntlsr->ntkl", B, B))
    full = linear_moments._product_covariance(used, lw.products, out, full=True)
    assert torch.allclose(full, want, atol=1e-12)
    assert torch.allclose(linear_moments._product_covariance(used, lw.products, out, full=False),
                          want.diagonal(dim1=-2, dim2=-1), atol=1e-12)


def test_product_terms_auto_keeps_a_subnetwork_and_drops_a_dense_factor():
    """products="auto": prepared where they cost at most 8x the first-order terms (a few correlated
    weights), not for a factor over every weight of a wide layer (unless asked for)."""
    g = torch.Generator().manual_seed(14)
    W = torch.zeros(10, 50, dtype=torch.float64)
    dense = torch.randn(10, 51, 20, generator=g, dtype=torch.float64)
    sparse = torch.zeros_like(dense)
    sparse[torch.randint(10, (24,), generator=g), torch.randint(50, (24,), generator=g)] = 1.0
    assert linear_moments.prepare_linear(W, None, None, sparse).products is not None
    assert linear_moments.prepare_linear(W, None, None, dense).products is None
    assert linear_moments.prepare_linear(W, None, None, dense, products=True).products is not None
    assert linear_moments.prepare_linear(W, None, None, sparse, products=False).products is None
    with pytest.raises(ValueError, match="products"):
        linear_moments.prepare_linear(W, None, None, sparse, products="always")


def test_sparse_factor_path_matches_dense():
    """A subnetwork factor (few correlated entries of [W, b]) takes the gathered path; same moments."""
    g = torch.Generator().manual_seed(4)
    out, n_in, r, N = 6, 20, 7, 9
    W = torch.randn(out, n_in, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64)
    G = torch.zeros(out, n_in + 1, r, dtype=torch.float64)
    rows, cols = torch.randint(out, (12,), generator=g), torch.randint(n_in + 1, (12,), generator=g)
    G[rows, cols] = torch.randn(12, r, generator=g, dtype=torch.float64)
    lw = linear_moments.prepare_linear(W, b, None, G, full=True)
    assert lw.sparse_idx is not None
    dense = lw._replace(sparse_idx=None, sparse_factor=None)
    x = gaussian_activation.Gaussian(torch.randn(N, n_in, generator=g, dtype=torch.float64),
                         torch.rand(N, n_in, generator=g, dtype=torch.float64),
                         torch.randn(N, n_in, r, generator=g, dtype=torch.float64))
    for full in (False, True):
        a, d = linear_moments.linear(x, lw, full), linear_moments.linear(x, dense, full)
        for u, v in zip(a, d):
            assert torch.allclose(u, v, atol=1e-12)


@pytest.mark.parametrize("order", ["index", "mean"])
def test_gumbel_max_link_is_the_softmax_for_a_point_posterior(order):
    mean, cov = _gaussian(N=200, F=10, scale=1.0, seed=5)
    mean = 3 * mean
    p = links.gumbel_max_softmax(mean, torch.zeros_like(mean), order)
    assert torch.allclose(p, torch.softmax(mean, -1), atol=1e-12)
    # independent logits: the covariance-free recursion equals the general one
    var = cov.diagonal(dim1=-2, dim2=-1)
    assert torch.allclose(links.gumbel_max_softmax(mean, var, order),
                          links.gumbel_max_softmax(mean, torch.diag_embed(var), order), atol=1e-12)
    raw = links.gumbel_max_softmax(mean, torch.zeros_like(mean), exact_at_zero=False)
    assert (raw - torch.softmax(mean, -1)).abs().max() > 1e-3     # what the correction removes


def test_layer_norm_mean_is_second_order_accurate():
    """Where the variances are a fair fraction of the spread of the mean, the normalised value's
    mean needs the Jensen gap of 1/sigma and its covariance with the centred input (the delta
    method): checked against 400k Monte Carlo draws, and against the first-order mean it replaces."""
    g = torch.Generator().manual_seed(7)
    N, F = 20, 16
    mean = torch.randn(N, F, generator=g, dtype=torch.float64)
    var = 0.05 + 0.2 * torch.rand(N, F, generator=g, dtype=torch.float64)
    out = norm_attention_moments.layer_norm(gaussian_activation.Gaussian(mean, var), None, None, 1e-5)
    mc = sum(torch.nn.functional.layer_norm(mean + var.sqrt() * torch.randn(50000, N, F, generator=g, dtype=torch.float64),
                                            (F,), eps=1e-5).mean(0) for _ in range(8)) / 8
    s = (mean.var(-1, unbiased=False, keepdim=True) + var.mean(-1, keepdim=True) + 1e-5).sqrt()
    first_order = (mean - mean.mean(-1, keepdim=True)) / s
    err, err_first = (out.mean - mc).abs().mean(), (first_order - mc).abs().mean()
    assert err < 0.7 * err_first      # measured: 0.0035 against 0.0062
    assert err < 0.005


@pytest.mark.parametrize("shared", [False, True])
def test_layer_norm_diagonal_path_matches_the_matrix_form(shared):
    """With diagonal activations the output variances come from O(F) sums per token instead of the
    F x F Jacobian (and ``P A`` without forming ``P``); they must equal the diagonal of the full
    (matrix) computation given the same input as a diagonal covariance."""
    g = torch.Generator().manual_seed(11)
    N, T, F = 4, 3, 6
    f64 = dict(generator=g, dtype=torch.float64)
    mean, var = torch.randn(N, T, F, **f64), torch.rand(N, T, F, **f64)
    A = torch.randn(N, T, F, 2, **f64) if shared else None
    w, b, wv, bv = torch.randn(F, **f64), torch.randn(F, **f64), torch.rand(F, **f64), torch.rand(F, **f64)
    diag = norm_attention_moments.layer_norm(gaussian_activation.Gaussian(mean, var, A), w, b, 1e-5, wv, bv)
    full = norm_attention_moments.layer_norm(gaussian_activation.Gaussian(mean, torch.diag_embed(var), A), w, b, 1e-5, wv, bv)
    assert torch.allclose(diag.mean, full.mean, atol=1e-12)
    assert torch.allclose(diag.var, full.var.diagonal(dim1=-2, dim2=-1), atol=1e-12)
    if shared:
        assert torch.allclose(diag.A, full.A, atol=1e-12)


def test_softmax_is_torch_softmax():
    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(1)) * 30
    assert torch.allclose(links.softmax(x), torch.softmax(x, -1), atol=1e-7)
