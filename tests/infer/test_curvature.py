import pytest
import torch
from torch import nn

from pyro_subnet.infer import curvature
from pyro_subnet.nn import BayesianNet, Categorical, ModelBridge, Normal


def _net_and_theta(out=3, seed=0):
    torch.manual_seed(seed)
    model = BayesianNet(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, out)),
                        "classification" if out > 1 else "regression", noise_scale=0.3)
    theta = torch.randn(model.layout.dim, dtype=torch.float64)
    return model, theta


def test_jacobian_matches_autograd_on_a_subset():
    model, theta = _net_and_theta()
    x = torch.randn(7, 3, dtype=torch.float64)
    idx = torch.tensor([36, 2, 17, 25, 0, 33])  # several sites, out of order
    f, J = curvature.jacobian(model.network, theta, x, idx, chunk_size=3)

    def out(t_sub):
        return model.network.flat(theta.index_put((idx,), t_sub), x)

    ref = torch.autograd.functional.jacobian(out, theta[idx])  # (N, O, k)
    assert J.shape == (7, 3, 6)
    assert torch.allclose(J, ref, atol=1e-10)
    assert torch.allclose(f, model.network.flat(theta, x), atol=1e-12)


def test_jvp_and_vjp_match_the_jacobian():
    model, theta = _net_and_theta()
    x = torch.randn(6, 3, dtype=torch.float64)
    idx = torch.tensor([1, 5, 30, 37])
    _, J = curvature.jacobian(model.network, theta, x, idx)
    v = torch.randn(2, 4, dtype=torch.float64)
    _, Jv = curvature.jvp(model.network, theta, x, v, idx)
    assert torch.allclose(Jv, torch.einsum("nok,bk->bno", J, v), atol=1e-10)
    u = torch.randn(2, 6, 3, dtype=torch.float64)
    assert torch.allclose(curvature.vjp(model.network, theta, x, u, idx), torch.einsum("nok,bno->bk", J, u),
                          atol=1e-10)
    _, Jv_all = curvature.jvp(model.network, theta, x, torch.ones(model.layout.dim, dtype=torch.float64))
    _, J_all = curvature.jacobian(model.network, theta, x)
    assert torch.allclose(Jv_all, J_all.sum(-1), atol=1e-10)


def test_output_hessians_match_autograd():
    f = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1])
    lik = Categorical()
    for n in range(4):
        H = torch.autograd.functional.hessian(lambda fn: -lik.log_prob(fn, y[n]), f[n])
        assert torch.allclose(lik.output_hessian(f)[n], H, atol=1e-12)
        L = lik.output_hessian_sqrt(f)[n]
        assert torch.allclose(L @ L.T, H, atol=1e-12)
    g = Normal(noise_scale=0.5)
    f1 = torch.randn(4, 1, dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda fn: -g.log_prob(fn, torch.zeros(4, dtype=torch.float64)).sum(), f1)
    assert torch.allclose(H.reshape(4, 4), torch.eye(4, dtype=torch.float64) * 4.0)
    assert torch.allclose(g.output_hessian(f1), torch.full((4, 1, 1), 4.0, dtype=torch.float64))


def test_ggn_subset_is_a_block_of_the_full_ggn_and_diag_is_its_diagonal():
    model, theta = _net_and_theta()
    x = torch.randn(30, 3, dtype=torch.float64)
    G = curvature.ggn(model.network, model.likelihood, theta, x, batch_size=7)
    idx = torch.tensor([3, 35, 12, 0, 28])
    G_sub = curvature.ggn(model.network, model.likelihood, theta, (x, None), idx, batch_size=11)
    assert torch.allclose(G_sub, G[idx][:, idx], atol=1e-10)
    G_diag = curvature.ggn(model.network, model.likelihood, theta, x, structure="diag")
    assert torch.allclose(G_diag, torch.diagonal(G), atol=1e-10)
    # and equals the definition sum_n J_n^T Lambda_n J_n with autograd's output Hessian
    _, J = curvature.jacobian(model.network, theta, x)
    Lam = model.likelihood.output_hessian(model.network.flat(theta, x))
    assert torch.allclose(G, torch.einsum("nod,nop,npe->de", J, Lam, J), atol=1e-10)


def test_ggn_of_linear_gaussian_model_is_the_exact_hessian_of_the_negative_log_posterior():
    torch.manual_seed(1)
    model = BayesianNet(nn.Linear(4, 1), "regression", prior_scale=0.7, noise_scale=0.3)
    x = torch.randn(25, 4, dtype=torch.float64)
    y = torch.randn(25, dtype=torch.float64)
    theta = torch.randn(model.layout.dim, dtype=torch.float64)
    P = curvature.ggn(model.network, model.likelihood, theta, (x, y)) + torch.diag(
        model.prior_precision(dtype=torch.float64))

    bridge = ModelBridge(model, x)

    def neg_log_post(t):
        return -(bridge.log_likelihood(t, x, y).sum() + bridge.log_prior(t))

    H = torch.autograd.functional.hessian(neg_log_post, theta)
    assert torch.allclose(P, H, atol=1e-10)
    # closed form: X^T X / sigma^2 + I / s^2 with X = [x, 1]
    X = torch.cat([x, torch.ones(25, 1, dtype=torch.float64)], 1)
    assert torch.allclose(P, X.T @ X / 0.09 + torch.eye(5, dtype=torch.float64) / 0.49, atol=1e-10)


def test_ggn_accepts_a_dataloader():
    model, theta = _net_and_theta()
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    a = curvature.ggn(model.network, model.likelihood, theta, loader, torch.arange(10))
    b = curvature.ggn(model.network, model.likelihood, theta, (x, y), torch.arange(10))
    assert torch.allclose(a, b, atol=1e-10)
    with pytest.raises(ValueError, match="structure"):
        curvature.ggn(model.network, model.likelihood, theta, x, structure="kron")


def test_ggn_vector_products_match_the_dense_ggn():
    model, theta = _net_and_theta()
    x = torch.randn(9, 3, dtype=torch.float64)
    idx = torch.tensor([0, 7, 20, 31, 37])
    G = curvature.ggn(model.network, model.likelihood, theta, x, idx)
    V = torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(curvature.ggn_vp(model.network, model.likelihood, theta, x, V, idx), V @ G, atol=1e-10)
    G_all = curvature.ggn(model.network, model.likelihood, theta, x)
    v = torch.randn(model.layout.dim, dtype=torch.float64)
    assert torch.allclose(curvature.ggn_vp(model.network, model.likelihood, theta, x, v), G_all @ v, atol=1e-10)
