"""AnnealedSMC against closed forms: conjugate Bayesian linear regression (posterior moments and
log evidence), a symmetric bimodal posterior, and the schedules' own arithmetic."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pyro_subnet.infer.smc import Adaptive, AnnealedSMC, DataPath, Linear, log_ess
from pyro_subnet.infer.smc.annealed_smc import _start_noise
from pyro_subnet.data import conjugate_regression
from pyro_subnet.nn import BayesianNet


def _conjugate_problem(n=60, d=2, sigma=0.5, alpha=1.0):
    ref = conjugate_regression(n, weights=(1.0, -0.5)[:d], noise=sigma, prior_scale=alpha)
    model = BayesianNet(nn.Linear(d, 1).double(), "regression", prior_scale=alpha, noise_scale=sigma)
    return model, ref.x, ref.y, ref.posterior_mean, ref.posterior_cov, ref.log_evidence


@pytest.mark.parametrize("schedule,move", [("full", "mala"), ("adaptive", "mala"), ("adaptive", "hmc")])
def test_conjugate_linear_regression_matches_exact_posterior_and_evidence(schedule, move):
    model, x, y, mean, cov, log_z = _conjugate_problem()
    assert model.layout.names == ["weight", "bias"]
    p = 600
    smc = AnnealedSMC(model, num_particles=p, batch_size=10, schedule=schedule, move=move, seed=1, progress=False)
    smc.run(x, y)
    theta = smc.particles()[0]
    sd = cov.diag().sqrt()
    # Monte Carlo error: resampling and correlated moves leave fewer than P effective draws;
    # 5 / sqrt(P) posterior standard deviations (~0.2 sd) is about 3 standard errors at ESS = P/3.
    assert ((theta.mean(0) - mean).abs() / sd < 5 / math.sqrt(p)).all(), (theta.mean(0), mean)
    emp_cov = torch.cov(theta.T)
    # A variance from ESS ~ P/3 draws has a relative standard error of sqrt(2 / (P/3)) = 0.1: 3 of them.
    assert torch.allclose(emp_cov.diag() / cov.diag(), torch.ones(3, dtype=torch.float64), atol=0.3)
    corr = lambda c: c / torch.outer(c.diag().sqrt(), c.diag().sqrt())  # noqa: E731
    assert torch.allclose(corr(emp_cov), corr(cov), atol=0.1)
    assert abs(float(smc.log_evidence[0]) - log_z) < 0.5, (float(smc.log_evidence[0]), log_z)
    d = smc.diagnostics()
    assert d["level"]["chain 0"][-1] == DataPath(60, None if schedule == "full" else 10).num_batches
    assert d["num_data"]["chain 0"][-1] == 60


def test_adaptive_data_annealing_is_cheaper_than_full_batch_in_examples():
    model, x, y, *_ = _conjugate_problem()
    cost = {}
    for schedule in ("full", "adaptive"):
        smc = AnnealedSMC(model, num_particles=200, batch_size=5, schedule=schedule, seed=0, progress=False)
        smc.run(x, y)
        cost[schedule] = smc.diagnostics()["data_grad_evals"]["chain 0"]
        nd = smc.diagnostics()["num_data"]["chain 0"]
        assert all(a <= b for a, b in zip(nd, nd[1:]))   # data only ever come in
    assert cost["adaptive"] < cost["full"]


def test_bimodal_posterior_keeps_both_modes():
    # f(x) = w2 tanh(w1 x) is unchanged by (w1, w2) -> (-w1, -w2): the posterior has two mirror modes
    # of equal mass.
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-2, 2, 40, dtype=torch.float64)[:, None]
    y = 1.5 * torch.tanh(1.5 * x[:, 0]) + 0.2 * torch.randn(40, generator=g, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Tanh(), nn.Linear(1, 1, bias=False)).double()
    model = BayesianNet(net, "regression", prior_scale=2.0, noise_scale=0.2)
    smc = AnnealedSMC(model, num_particles=500, batch_size=5, schedule="adaptive", seed=0, progress=False)
    smc.run(x, y)
    theta = smc.particles()[0]
    upper = theta[:, 0] > 0
    assert 0.3 < float(upper.double().mean()) < 0.7
    assert torch.allclose(theta[upper].mean(0), -theta[~upper].mean(0), atol=0.1)
    assert (theta[upper].mean(0) > 1.0).all()


def test_data_path_coefficients():
    path = DataPath(num_data=10, batch_size=4)
    assert path.num_batches == 3 and path.bounds(2) == (8, 10)
    n, c = path.included(2.25)
    assert n == 10 and torch.allclose(c, torch.tensor([1.0] * 8 + [0.25] * 2))
    assert path.included(0.0)[0] == 0 and path.included(3.0)[0] == 10
    assert DataPath(10, None).num_batches == 1


def test_adaptive_schedule_hits_the_ess_threshold_and_linear_adds_whole_batches():
    g = torch.Generator().manual_seed(0)
    ll = torch.randn(4, 100, generator=g, dtype=torch.float64) * 3.0   # per-batch log-likelihoods
    path = DataPath(400, 100)
    log_w = torch.full((100,), -math.log(100), dtype=torch.float64)
    level, inc, evaluated = Adaptive(0.5, tol=1e-8)(log_w, 0.0, lambda b: ll[b], path)
    assert 0 < level < 1 and evaluated == 1
    assert abs(float(log_ess(log_w + inc).exp()) - 50.0) < 1e-3
    assert torch.allclose(inc, level * ll[0])
    # A flat likelihood never lowers the ESS: the adaptive rule takes all the data in one step.
    level, inc, evaluated = Adaptive(0.5)(log_w, 0.0, lambda b: torch.zeros(100, dtype=torch.float64), path)
    assert level == 4.0 and evaluated == 4
    level, inc, evaluated = Linear(2)(log_w, 1.0, lambda b: ll[b], path)
    assert level == 3.0 and torch.allclose(inc, ll[1] + ll[2])


def test_staged_data_path_tempers_a_whole_stage_and_keeps_the_exact_posterior():
    path = DataPath(num_data=100, batch_size=10, growth=2.0)
    # Stages of 1, 1, 2, 4 batches; the remainder (2 batches < the next stage's 8) joins the last.
    assert path._stage_starts == [0, 1, 2, 4, 10] and path.stage(5.5) == (4, 10)
    n, c = path.included(7.0)   # half-way through stage [4, 10): batches 4..9 at fraction 0.5
    assert n == 100 and torch.allclose(c, torch.tensor([1.0] * 40 + [0.5] * 60))
    assert path.included(4.0)[0] == 40 and path.included(10.0)[0] == 100
    assert DataPath(100, 10, 1.0)._stage_starts == list(range(11))
    # Adaptive bisects the common fraction of the stage: the increment is that fraction of the
    # stage's summed log-likelihood, and the ESS lands on the threshold.
    g = torch.Generator().manual_seed(0)
    ll = torch.randn(10, 64, generator=g, dtype=torch.float64)
    log_w = torch.full((64,), -math.log(64), dtype=torch.float64)
    level, inc, evaluated = Adaptive(0.5, tol=1e-8)(log_w, 4.0, lambda b: ll[b], path)
    assert 4 < level < 10 and evaluated == 6
    assert torch.allclose(inc, (level - 4) / 6 * ll[4:].sum(0))
    assert abs(float(log_ess(log_w + inc).exp()) - 32.0) < 1e-3
    with pytest.raises(ValueError, match="growth=1"):
        Linear(1)(log_w, 0.0, lambda b: ll[b], path)
    with pytest.raises(ValueError, match="growth"):
        DataPath(100, 10, 0.5)
    # The staged path reaches the exact conjugate posterior and evidence like the one-batch path.
    model, x, y, mean, cov, log_z = _conjugate_problem()
    p = 600
    smc = AnnealedSMC(model, num_particles=p, batch_size=5, schedule="adaptive", batch_growth=2.0, seed=1,
                      progress=False)
    smc.run(x, y)
    theta = smc.particles()[0]
    assert ((theta.mean(0) - mean).abs() / cov.diag().sqrt() < 5 / math.sqrt(p)).all(), (theta.mean(0), mean)
    assert torch.allclose(torch.cov(theta.T).diag() / cov.diag(), torch.ones(3, dtype=torch.float64), atol=0.2)
    assert abs(float(smc.log_evidence[0]) - log_z) < 0.5, (float(smc.log_evidence[0]), log_z)
    nd = smc.diagnostics()["num_data"]["chain 0"]
    assert set(nd) <= {5, 10, 20, 40, 60} and nd[-1] == 60
    with pytest.raises(ValueError, match="batch_growth"):
        AnnealedSMC(model, 8, 5, schedule="linear", batch_growth=2.0)


def test_a_gaussian_start_bridges_to_the_exact_posterior_and_evidence():
    """Particles drawn from a shifted, too-wide diagonal Gaussian instead of the prior: the path
    q^(1 - s/B) p^(s/B) prod_b p(D_b | theta)^c_b(s) still ends at the exact posterior, and the
    evidence estimate is still log p(D) (q is normalised)."""
    model, x, y, mean, cov, log_z = _conjugate_problem()
    sd = cov.diag().sqrt()
    start = SimpleNamespace(mean=mean + 0.3 * sd, var=1.5 * cov.diag())
    p = 600
    smc = AnnealedSMC(model, num_particles=p, batch_size=10, seed=1, progress=False, start=start)
    smc.run(x, y)
    theta = smc.particles()[0]
    assert ((theta.mean(0) - mean).abs() / sd < 5 / math.sqrt(p)).all(), (theta.mean(0), mean)
    assert torch.allclose(torch.cov(theta.T).diag() / cov.diag(), torch.ones(3, dtype=torch.float64), atol=0.3)
    assert abs(float(smc.log_evidence[0]) - log_z) < 0.5, (float(smc.log_evidence[0]), log_z)
    # the start is where the posterior is: fewer steps than from the prior
    prior_run = AnnealedSMC(model, num_particles=p, batch_size=10, seed=1, progress=False)
    prior_run.run(x, y)
    assert len(smc.diagnostics()["level"]["chain 0"]) < len(prior_run.diagnostics()["level"]["chain 0"])


def test_a_start_must_be_a_diagonal_gaussian_over_the_weights():
    model, *_ = _conjugate_problem()
    with pytest.raises(ValueError, match="positive variances"):
        AnnealedSMC(model, num_particles=8, batch_size=10, start=SimpleNamespace(mean=torch.zeros(3),
                                                                                 var=torch.zeros(3)))
    with pytest.raises(TypeError, match="flat_posterior"):
        AnnealedSMC(model, num_particles=8, batch_size=10, start=object())


def test_a_start_with_a_noise_scale_centres_log_sigma_there():
    """A start's noise scale gives log sigma its start density N(log sigma, 1/(2N)) (the Laplace
    variance of a Gaussian likelihood in log sigma); a start without one leaves it to its prior."""
    guide = SimpleNamespace(mean=torch.zeros(3), var=torch.ones(3), noise_scale=torch.tensor(0.2))
    loc, var = _start_noise(guide, 50)
    assert loc == pytest.approx(math.log(0.2)) and var == pytest.approx(0.01)
    assert _start_noise(SimpleNamespace(mean=torch.zeros(3), var=torch.ones(3)), 50) is None
