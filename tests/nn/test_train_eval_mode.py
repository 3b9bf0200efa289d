"""Inference runs the network in eval mode; MAP fitting in training mode; flags are restored."""

import pyro
import pytest
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

import pyro_subnet as ps


def _fit(net, ds, subnet=None):
    model = ps.nn.BayesianNet(net, "classification")
    guide = ps.infer.AutoSubnetLaplace(model, subnet=subnet or ps.subnet.LastLayer(), map_steps=300,
                                       progress=False).fit(ds.x_train, ds.y_train)
    return model, guide


def test_dropout_is_off_at_prediction_and_the_users_flag_is_kept():
    ds = ps.data.two_moons(n=100)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 2)).train()
    model, guide = _fit(net, ds)
    first = guide.predict(ds.x_test)
    assert torch.equal(guide.predict(ds.x_test), first)
    assert torch.equal(guide.predict(ds.x_test, method="nn", generator=torch.Generator().manual_seed(0)),
                       guide.predict(ds.x_test, method="nn", generator=torch.Generator().manual_seed(0)))
    assert ps.metrics.accuracy(first, ds.y_test) > 0.85
    assert net.training and all(m.training for m in net.modules())          # the user's module, untouched
    theta = guide.loc.expand(3, -1)
    f = model.network.flat_batched(theta, ds.x_test)
    assert torch.equal(f[0], f[1])                                           # no dropout over draws either


def test_a_pyromodule_network_runs_in_eval_mode_and_gets_its_flags_back():
    class Net(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc = PyroModule[nn.Linear](3, 4)
            self.fc.weight = PyroSample(pyro.distributions.Normal(0.0, 1.0).expand([4, 3]).to_event(2))
            self.drop = nn.Dropout(0.9)

        def forward(self, x):
            return self.drop(self.fc(x))

    net = Net().train()
    fnet = ps.nn.FunctionalNet(net, example_input=torch.randn(2, 3))
    w = {"fc.weight": torch.randn(4, 3)}
    x = torch.randn(5, 3)
    assert torch.equal(fnet(w, x), fnet(w, x)) and torch.equal(fnet(w, x), nn.functional.linear(x, w["fc.weight"], net.fc.bias))
    assert net.training and net.drop.training
    with fnet.training():
        assert not torch.equal(fnet(w, x), fnet(w, x))                       # dropout on while training
    assert net.training and net.drop.training


def test_batchnorm_learns_running_statistics_in_the_map_and_uses_them_after():
    ds = ps.data.two_moons(n=100)
    ds.x_train.mul_(3.0).add_(2.0)
    ds.x_test.mul_(3.0).add_(2.0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2))
    model, guide = _fit(net, ds, subnet=ps.subnet.LargestMagnitude(40))
    bn = model.network.module[1]
    assert int(bn.num_batches_tracked) == 300 and float(bn.running_mean.abs().max()) > 0.1
    probs = guide.predict(ds.x_test)
    assert torch.equal(guide.predict(ds.x_test), probs) and ps.metrics.accuracy(probs, ds.y_test) > 0.85
    # One test example alone gets the same prediction as in the batch (running, not batch, statistics).
    assert torch.allclose(guide.predict(ds.x_test[:1]), probs[:1], atol=1e-6)
    # The running statistics travel with the guide's state into a fresh model.
    torch.manual_seed(1)
    fresh_model = ps.nn.BayesianNet(nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2)),
                                    "classification")
    fresh = ps.infer.AutoSubnetLaplace(fresh_model, subnet=ps.subnet.LargestMagnitude(40))
    fresh.load_state_dict(guide.state_dict())
    assert torch.allclose(fresh.predict(ds.x_test), probs, atol=1e-6, rtol=0)
    draws = pyro.infer.Predictive(model, guide=guide, num_samples=4, parallel=True)(ds.x_test)["obs"]
    assert draws.shape == (4, len(ds.x_test))


def test_a_recurrent_network_works_through_a_loop_over_draws():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(1, 5, batch_first=True)
            self.out = nn.Linear(5, 2)

        def forward(self, x):
            h, _ = self.lstm(x.unsqueeze(-1))
            return self.out(h[:, -1])

    ds = ps.data.two_moons(n=100)
    torch.manual_seed(0)
    model, guide = _fit(Recurrent(), ds)
    assert ps.metrics.accuracy(guide.predict(ds.x_test), ds.y_test) > 0.8
    theta = guide.loc + 0.01 * torch.randn(3, guide.loc.numel())
    with pytest.warns(RuntimeWarning, match="one by one"):
        f = model.network.flat_batched(theta, ds.x_test)
    for i in range(3):
        assert torch.allclose(f[i], model.network.flat(theta[i], ds.x_test), atol=1e-6)
