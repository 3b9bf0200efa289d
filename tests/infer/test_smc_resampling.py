"""Resampling schemes: unbiased offspring counts, equal weights afterwards, clear errors."""

import math

import pytest
import torch

from pyro_subnet.infer.smc import resample
from pyro_subnet.infer.smc.resampling import RESAMPLERS, get_resampler


@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
def test_offspring_counts_are_unbiased(scheme):
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.05, 0.4, 0.15, 0.3, 0.1], dtype=torch.float64)
    m, reps = 7, 4000
    counts = torch.stack([torch.bincount(RESAMPLERS[scheme](g, w, m), minlength=5) for _ in range(reps)]).double()
    expected = m * w
    # Each count's mean is within 4 standard errors of M * w_i.
    se = counts.std(0) / math.sqrt(reps)
    assert ((counts.mean(0) - expected).abs() <= 4 * se + 1e-9).all(), (counts.mean(0), expected)
    assert (counts.sum(1) == m).all()


@pytest.mark.parametrize("scheme", ["systematic", "stratified"])
def test_low_variance_schemes_keep_counts_near_expectation(scheme):
    # Both have lower variance than multinomial; systematic gives floor(M w_i) or ceil(M w_i).
    g = torch.Generator().manual_seed(1)
    w = torch.tensor([0.05, 0.4, 0.15, 0.3, 0.1], dtype=torch.float64)
    var = {s: torch.stack([torch.bincount(RESAMPLERS[s](g, w, 10), minlength=5) for _ in range(2000)]).double()
           .var(0).sum() for s in (scheme, "multinomial")}
    assert var[scheme] < 0.6 * var["multinomial"]
    if scheme == "systematic":
        counts = torch.stack([torch.bincount(RESAMPLERS[scheme](g, w, 10), minlength=5) for _ in range(200)])
        assert ((counts - 10 * w).abs() < 1 + 1e-9).all()


@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
def test_resample_leaves_equal_weights(scheme):
    g = torch.Generator().manual_seed(0)
    particles = torch.arange(6.0)[:, None]
    log_w = torch.log(torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1]))
    theta, new_log_w, idx = resample(g, particles, log_w, scheme)
    assert torch.allclose(new_log_w, torch.full((6,), -math.log(6)))
    assert torch.equal(theta[:, 0], particles[idx, 0])


def test_bad_inputs_raise_clear_errors():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="non-negative"):
        RESAMPLERS["systematic"](g, torch.tensor([0.5, float("nan")]), 2)
    with pytest.raises(ValueError, match="num_samples"):
        RESAMPLERS["multinomial"](g, torch.tensor([0.5, 0.5]), 0)
    with pytest.raises(ValueError, match="choose one of"):
        get_resampler("residual")
