"""The SMC moves: the particle proposal covariance, invariance of the moves under it, the
adaptive number of moves and the warning when the particles do not mix."""

import sys
import math

import pytest
import torch

from pyro_subnet.infer import AnnealedSMC
from pyro_subnet.infer.smc.kernels import hmc, mala
from pyro_subnet.infer.smc.proposal_covariance import ParticleCovariance

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_smc_annealed import _conjugate_problem  # noqa: E402


@pytest.mark.parametrize("num_particles", [3, 7])      # low-rank (P < D) and dense forms
def test_particle_covariance_is_a_covariance_and_its_inverse(num_particles):
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(num_particles, 4, generator=g, dtype=torch.float64)
    log_w = torch.log_softmax(torch.randn(num_particles, generator=g, dtype=torch.float64), 0)
    cov = ParticleCovariance(theta, log_w, torch.rand(4, generator=g, dtype=torch.float64) + 0.5)
    eye = torch.eye(4, dtype=torch.float64)
    sigma = cov.mul(eye)
    assert torch.allclose(sigma, sigma.T) and torch.linalg.eigvalsh(sigma).min() > 0
    assert torch.allclose(cov.solve(eye), torch.linalg.inv(sigma), atol=1e-10)
    z = cov.sample(lambda shape: torch.randn(*shape, generator=g, dtype=torch.float64),
                   torch.zeros(100_000, 4, dtype=torch.float64))
    assert (torch.cov(z.T) - sigma).abs().max() < 0.03 * sigma.abs().max()


@pytest.mark.parametrize("kernel", [mala, hmc])
def test_moves_with_the_particle_covariance_keep_a_correlated_gaussian(kernel):
    """Particles drawn from N(0, C) (correlation 0.95) stay distributed as N(0, C) under 30
    Metropolis-Hastings moves preconditioned by their own covariance."""
    g = torch.Generator().manual_seed(1)
    c = torch.tensor([[1.0, 0.95], [0.95, 1.0]], dtype=torch.float64)
    prec = torch.linalg.inv(c)
    chol = torch.linalg.cholesky(c)

    def log_density(t):
        return -0.5 * ((t @ prec) * t).sum(-1), -t @ prec

    theta = torch.randn(2000, 2, generator=g, dtype=torch.float64) @ chol.T
    w = torch.full((2000,), -math.log(2000), dtype=torch.float64)
    cov = ParticleCovariance(theta, w, theta.std(0))
    lp, grad = log_density(theta)
    accept = []
    for _ in range(30):
        out = kernel(g, theta, lp, grad, log_density, 0.5, cov)
        theta, lp, grad = out.theta, out.log_prob, out.grad
        accept.append(float(out.accept_prob.mean()))
    assert min(accept) > 0.3                       # the proposal follows the correlation
    assert theta.mean(0).abs().max() < 0.06
    assert (torch.cov(theta.T) - c).abs().max() < 0.08


def test_moves_continue_until_decorrelated_and_warn_when_they_cannot():
    model, x, y, *_ = _conjugate_problem()
    smc = AnnealedSMC(model, num_particles=200, batch_size=10, num_mcmc_steps=2, max_mcmc_steps=20,
                      target_correlation=0.05, seed=0, progress=False)
    smc.run(x, y)
    d = smc.diagnostics()
    moves, corr = d["num_mcmc_steps"]["chain 0"], d["move_correlation"]["chain 0"]
    assert all(m % 2 == 0 and 2 <= m <= 20 for m in moves) and max(moves) > 2
    assert all(r <= 0.05 or m == 20 for r, m in zip(corr, moves))
    # A correlation of -1 is never reached: every step runs out of moves, and the run says so.
    smc = AnnealedSMC(model, num_particles=100, batch_size=10, num_mcmc_steps=2, max_mcmc_steps=2,
                      target_correlation=-1.0, seed=0, progress=False)
    with pytest.warns(RuntimeWarning, match="have not mixed"):
        smc.run(x, y)
