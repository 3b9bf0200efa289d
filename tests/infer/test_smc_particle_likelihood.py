"""The particle-batched MLP path gives the model's own log-likelihoods and gradients."""

import pytest
import torch
from torch import nn

from pyro_subnet.infer.smc.particle_likelihood import mlp_plan, particle_log_lik, particle_outputs
from pyro_subnet.nn import BayesianNet, ModelBridge


def _data(likelihood, outputs, n=20):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g)
    if likelihood == "classification":
        return x, torch.randint(0, outputs, (n,), generator=g)
    return x, torch.randn(n, generator=g) if outputs == 1 else torch.randn(n, outputs, generator=g)


@pytest.mark.parametrize("net,likelihood,outputs", [
    (nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)), "classification", 3),
    (nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)), "regression", 1),
    (nn.Sequential(nn.Linear(3, 8, bias=False), nn.SiLU(), nn.Linear(8, 2)), "regression", 2),
])
def test_mlp_path_matches_vmap_path(net, likelihood, outputs):
    torch.manual_seed(0)
    kw = {} if likelihood == "classification" else {"noise_scale": 0.3}
    model = BayesianNet(net, likelihood, **kw)
    assert mlp_plan(model.network) is not None
    x, y = _data(likelihood, outputs)
    theta = torch.randn(6, model.layout.dim, requires_grad=True)
    bridge = ModelBridge(model, x)
    fast, ref = particle_log_lik(bridge)(theta, x, y), bridge.log_likelihood(theta, x, y)
    assert fast.shape == ref.shape == (6, 20)
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-4)
    (g_fast,), (g_ref,) = torch.autograd.grad(fast.sum(), theta), torch.autograd.grad(ref.sum(), theta)
    assert torch.allclose(g_fast, g_ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(particle_outputs(bridge)(theta, x), model.network.flat_batched(theta, x), atol=1e-5)


def test_other_networks_use_the_model_path():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) + x[:, :2]

    model = BayesianNet(Skip(), "classification")
    assert mlp_plan(model.network) is None
    assert mlp_plan(BayesianNet(nn.Sequential(nn.Linear(3, 4), nn.Dropout(), nn.Linear(4, 2)),
                                "classification").network) is None
    x, y = _data("classification", 2)
    theta = torch.randn(4, model.layout.dim)
    bridge = ModelBridge(model, x)
    assert torch.equal(particle_log_lik(bridge)(theta, x, y), bridge.log_likelihood(theta, x, y))
