"""fit_map_by_evidence: the prior scale the evidence framework settles on, against the closed form."""

import math

import pytest
import torch
from torch import nn

import pyro_subnet as ps
from pyro_subnet.nn import BayesianNet


def _linear_data(n=80):
    x = torch.randn(n, 3, dtype=torch.float64)
    y = x @ torch.tensor([0.8, -0.5, 0.3], dtype=torch.float64) + 0.2 + 0.3 * torch.randn(n, dtype=torch.float64)
    return x, y


def _closed_form_log_evidence(x, y, prior_scale, noise_scale):
    """log N(y; 0, noise^2 I + prior_scale^2 [x 1][x 1]^T): the bias has the same Normal prior."""
    phi = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    cov = noise_scale ** 2 * torch.eye(len(x), dtype=x.dtype) + prior_scale ** 2 * phi @ phi.T
    return torch.distributions.MultivariateNormal(torch.zeros(len(x), dtype=x.dtype), cov).log_prob(y)


def test_linear_model_settles_on_the_closed_form_evidence_maximum():
    x, y = _linear_data()
    model = BayesianNet(nn.Linear(3, 1).double(), likelihood="regression", prior_scale=5.0, noise_scale=0.3)
    result = ps.infer.fit_map_by_evidence(model, x, y, rounds=20, tol=1e-4, num_steps=1500, lr=0.05,
                                          batch_size=None, progress=False)
    grid = torch.logspace(-1.5, 1.0, 2001, dtype=torch.float64)
    best = grid[torch.stack([_closed_form_log_evidence(x, y, s, 0.3) for s in grid]).argmax()]
    assert result.prior_scale == pytest.approx(float(best), rel=0.02)
    assert model.prior_scale == result.prior_scale
    # the evidence rises along the rounds (each round's MAP is the exact posterior mean here)
    evidences = [h["log_evidence"] for h in result.history]
    assert evidences[-1] >= evidences[0]
    assert evidences[-1] == pytest.approx(float(_closed_form_log_evidence(x, y, result.history[-1]["prior_scale"], 0.3)),
                                          abs=1e-3)


def test_learned_noise_is_refitted_and_kept():
    x, y = _linear_data(200)
    model = BayesianNet(nn.Linear(3, 1).double(), likelihood="regression", prior_scale=5.0, noise_scale=None)
    result = ps.infer.fit_map_by_evidence(model, x, y, num_steps=800, lr=0.05, batch_size=None, progress=False)
    assert result.noise_scale == model.noise_scale
    assert 0.25 < result.noise_scale < 0.35            # the data's noise is 0.3
    assert math.isfinite(result.prior_scale) and result.prior_scale < 5.0


def test_a_model_with_its_own_prior_is_refused():
    x, y = _linear_data(20)
    model = BayesianNet(nn.Linear(3, 1).double(), likelihood="regression", noise_scale=0.3,
                        prior=lambda name, shape: torch.distributions.Laplace(torch.zeros(shape), 1.0).to_event(len(shape)))
    with pytest.raises(ValueError, match="default Normal prior"):
        ps.infer.fit_map_by_evidence(model, x, y, progress=False)
    with pytest.raises(ValueError, match="BayesianNet"):
        ps.infer.fit_map_by_evidence(lambda x, y=None: None, x, y, progress=False)
