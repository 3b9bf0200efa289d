import torch
from torch import nn

from pyro_subnet.infer import fit_map
from pyro_subnet.nn import BayesianNet


def test_map_of_linear_regression_is_the_ridge_solution():
    torch.manual_seed(0)
    x = torch.randn(40, 3, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 + 0.2 * torch.randn(40, dtype=torch.float64)
    model = BayesianNet(nn.Linear(3, 1), "regression", prior_scale=0.5, noise_scale=0.2)
    res = fit_map(model, x, y, num_steps=3000, lr=0.02, batch_size=None, progress=False)
    X = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)
    A = X.T @ X / 0.04 + torch.eye(4, dtype=torch.float64) / 0.25
    exact = torch.linalg.solve(A, X.T @ y / 0.04)
    assert torch.allclose(res.theta, exact, atol=1e-4)
    assert res.losses[-1] < res.losses[0]


def test_fit_noise_false_holds_a_learned_noise_and_gives_the_ridge_solution_at_it():
    torch.manual_seed(0)
    x = torch.randn(40, 3, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 + 0.2 * torch.randn(40, dtype=torch.float64)
    model = BayesianNet(nn.Linear(3, 1), "regression", prior_scale=0.5, noise_scale=None)
    model.likelihood.set_noise_scale(0.5)
    res = fit_map(model, x, y, num_steps=3000, lr=0.02, batch_size=None, progress=False, fit_noise=False)
    assert res.noise_scale == model.noise_scale == 0.5
    X = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)
    exact = torch.linalg.solve(X.T @ X / 0.25 + torch.eye(4, dtype=torch.float64) / 0.25, X.T @ y / 0.25)
    assert torch.allclose(res.theta, exact, atol=1e-4)
