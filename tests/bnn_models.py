"""User-written Bayesian networks in the style of Pyro's tutorials, shared by the tests, and
the same architectures built with BayesianNet."""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

import pyro_subnet as ps


class RegressionBNN(PyroModule):
    """Pyro's tutorial BNN: per-layer prior scales, and a latent noise scale unless one is given."""

    def __init__(self, d=1, h=10, sigma=None, prior=dist.Normal):
        super().__init__()
        self.sigma = sigma
        self.fc1 = PyroModule[nn.Linear](d, h)
        self.fc1.weight = PyroSample(prior(0.0, 1.0).expand([h, d]).to_event(2))
        self.fc1.bias = PyroSample(prior(0.0, 1.0).expand([h]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](h, 1)
        self.fc2.weight = PyroSample(prior(0.0, h ** -0.5).expand([1, h]).to_event(2))
        self.fc2.bias = PyroSample(prior(0.0, 1.0).expand([1]).to_event(1))

    def forward(self, x, y=None):
        mu = self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0)) if self.sigma is None else self.sigma
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, sigma), obs=y)
        return mu


class ClassifierBNN(PyroModule):
    def __init__(self, d, h, c):
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](d, h)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([h, d]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([h]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](h, c)
        self.fc2.weight = PyroSample(dist.Normal(0.0, h ** -0.5).expand([c, h]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([c]).to_event(1))

    def forward(self, x, y=None):
        logits = self.fc2(torch.tanh(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def bayesian_net_twin(user, likelihood, noise_scale=0.1):
    """The same architecture and priors as a ps.nn.BayesianNet (same flat order of the weights)."""
    h = user.fc1.out_features
    net = nn.Sequential(nn.Linear(user.fc1.in_features, h), nn.Tanh(), nn.Linear(h, user.fc2.out_features))
    return ps.nn.BayesianNet(net, likelihood, prior_scale={"2.weight": h ** -0.5, "*": 1.0}, noise_scale=noise_scale)
