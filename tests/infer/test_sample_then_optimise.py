import torch
from torch import nn

from pyro_subnet.infer import curvature
from pyro_subnet.infer.autoguide import sample_then_optimise as sto
from pyro_subnet.nn import BayesianNet


def _classifier():
    torch.manual_seed(0)
    model = BayesianNet(nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)), "classification")
    theta = 0.5 * torch.randn(model.layout.dim, dtype=torch.float64)
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    return model, theta, x, y


def test_targets_have_the_right_covariance():
    # s = sum_n J_n^T L_n e_n has covariance G: check E[s s^T] against the dense GGN
    model, theta, x, y = _classifier()
    idx = torch.tensor([0, 5, 19, 40, 44])
    G = curvature.ggn(model.network, model.likelihood, theta, x, idx)
    g = torch.Generator().manual_seed(1)
    t = sto.draw_targets(model.network, model.likelihood, theta, x, 5000, idx, generator=g)
    emp = t.data_noise.T @ t.data_noise / 5000
    assert torch.allclose(emp, G, atol=0.1 * G.diagonal().max())
    assert torch.allclose(t.prior_noise.T @ t.prior_noise / 5000, torch.eye(5, dtype=torch.float64), atol=0.1)


def test_cg_solution_is_the_dense_solve_and_samples_have_covariance_h_inverse():
    model, theta, x, y = _classifier()
    idx = torch.arange(model.layout.dim)
    a = torch.full((model.layout.dim,), 2.0, dtype=torch.float64)
    G = curvature.ggn(model.network, model.likelihood, theta, x, idx)
    H = G + torch.diag(a)
    g = torch.Generator().manual_seed(2)
    t = sto.draw_targets(model.network, model.likelihood, theta, x, 4000, idx, generator=g)
    b = a * t.targets(a)
    sol = sto.solve_cg(model.network, model.likelihood, theta, x, a, b, torch.zeros_like(b), t.diag_ggn(), idx,
                       tol=1e-10, max_iter=200)
    assert sol.residual < 1e-9
    assert torch.allclose(sol.samples, torch.linalg.solve(H, b.T).T, atol=1e-7)
    assert torch.allclose(sol.g_samples, sol.samples @ G, atol=1e-7)
    cov = sol.samples.T @ sol.samples / 4000
    Sigma = torch.linalg.inv(H)
    # Monte Carlo error of a covariance entry ~ sqrt((S_ii S_jj + S_ij^2) / K)
    se = ((Sigma.diagonal()[:, None] * Sigma.diagonal()[None] + Sigma ** 2) / 4000).sqrt()
    assert ((cov - Sigma).abs() < 4 * se + 1e-12).float().mean() > 0.99
    gamma = sto.effective_dimension(sol)
    exact = torch.trace(torch.linalg.solve(H, G))
    assert abs(float(gamma - exact)) < 0.1 * float(exact)


def test_sgd_solver_reaches_the_cg_solution():
    model, theta, x, y = _classifier()
    a = torch.full((model.layout.dim,), 5.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    t = sto.draw_targets(model.network, model.likelihood, theta, x, 4, generator=g)
    b = a * t.targets(a)
    ref = sto.solve_cg(model.network, model.likelihood, theta, x, a, b, torch.zeros_like(b), t.diag_ggn(), tol=1e-10)
    sgd = sto.solve_sgd(model.network, model.likelihood, theta, (x, y), a, b, t.targets(a), batch_size=20,
                        lr=0.02, num_epochs=30, polyak=0.1, tol=1e-3, generator=torch.Generator().manual_seed(0))
    assert sgd.residual < 1e-3 + 1e-12 or sgd.iterations == 30
    assert (sgd.samples - ref.samples).norm() < 0.05 * ref.samples.norm()
