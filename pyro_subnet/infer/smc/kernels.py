"""Move kernels for the particles: MALA and HMC, every particle at once.

Each kernel leaves the current partial posterior :math:`\\pi_s` invariant (Metropolis-Hastings
correction), acts on all particles ``theta`` of shape ``(P, D)`` in one tensor operation, and is
preconditioned by a proposal covariance :math:`M^{-1}` from the particle population
(:mod:`.proposal_covariance`: its per-coordinate spread, the usual SMC choice of Buchholz, Chopin
and Jacob 2021, or its low-rank-plus-diagonal covariance).

MALA (Roberts and Tweedie 1996):

.. math::

    \\theta' = \\theta + \\tfrac{\\epsilon^2}{2} M^{-1} \\nabla \\log\\pi(\\theta)
             + \\epsilon M^{-1/2} \\xi, \\qquad
    \\alpha = \\min\\Big(1, \\frac{\\pi(\\theta') q(\\theta \\mid \\theta')}
                          {\\pi(\\theta) q(\\theta' \\mid \\theta)}\\Big).

HMC (Neal 2011): ``num_leapfrog_steps`` leapfrog steps of size :math:`\\epsilon` with momentum
:math:`r \\sim \\mathcal{N}(0, M)`, accepted with :math:`\\min(1, e^{-\\Delta H})`.

A ``LogDensity`` is a function ``theta (P, D) -> (log pi (P,), grad (P, D))``; particles are
independent, so the gradient of the summed log density is every particle's own gradient.

>>> from pyro_subnet.infer.smc.kernels import mala
>>> def log_density(theta):
...     return -0.5 * (theta ** 2).sum(-1), -theta
>>> g = torch.Generator().manual_seed(0)
>>> theta = torch.randn(64, 2, generator=g)
>>> out = mala(g, theta, *log_density(theta), log_density, 0.5, torch.ones(2))
>>> out.theta.shape, out.accept_prob.shape
(torch.Size([64, 2]), torch.Size([64]))
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Tuple

import torch

from .proposal_covariance import DiagonalCovariance

LogDensity = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


class ParticleNoise(NamedTuple):
    """A generator shared by every rank, and which of the ``total`` particles this rank holds.

    Kernels draw the noise of all ``total`` particles and keep their own rows, so every rank's
    generator stays in step (the same schedule and resampling draws on every rank) and a run gives
    the same particles whatever the number of ranks. In one process it is the plain generator's
    stream. A kernel accepts a bare ``torch.Generator`` too."""

    generator: torch.Generator
    total: int
    part: slice


def _draw(fn, generator, shape, like: torch.Tensor) -> torch.Tensor:
    if isinstance(generator, ParticleNoise):
        full = fn((generator.total, *shape[1:]), generator=generator.generator, dtype=like.dtype, device=like.device)
        return full[generator.part]
    return fn(shape, generator=generator, dtype=like.dtype, device=like.device)


class MoveState(NamedTuple):
    """Particles after one move, with their log density and gradient cached for the next."""

    theta: torch.Tensor        # (P, D)
    log_prob: torch.Tensor     # (P,)
    grad: torch.Tensor         # (P, D)
    accept_prob: torch.Tensor  # (P,) Metropolis-Hastings acceptance probability of this move


def _accept(generator, log_ratio, theta, log_prob, grad, theta_new, log_prob_new, grad_new) -> MoveState:
    # A non-finite proposal (overflow far in the tails) is simply rejected.
    log_ratio = torch.where(torch.isfinite(log_ratio), log_ratio, torch.full_like(log_ratio, -float("inf")))
    accept_prob = log_ratio.clamp(max=0).exp()
    u = _draw(torch.rand, generator, log_ratio.shape, log_ratio)
    take = u < accept_prob
    return MoveState(torch.where(take[:, None], theta_new, theta), torch.where(take, log_prob_new, log_prob),
                     torch.where(take[:, None], grad_new, grad), accept_prob)


def _finite_or_start(q: torch.Tensor, start: torch.Tensor, diverged: torch.Tensor):
    """Particles whose proposal left the finite numbers (an overflowing gradient far in the
    tails) go back to their start and are marked, so the target is never evaluated at NaN and
    the move rejects them."""
    diverged = diverged | ~torch.isfinite(q).all(-1)
    return torch.where(diverged[:, None], start, q), diverged


def _covariance(cov):
    """A proposal covariance (:mod:`.proposal_covariance`), or a per-coordinate scale ``(D,)``."""
    return DiagonalCovariance(cov) if isinstance(cov, torch.Tensor) else cov


def mala(generator: torch.Generator, theta: torch.Tensor, log_prob: torch.Tensor, grad: torch.Tensor,
         log_density: LogDensity, step_size: float, cov) -> MoveState:
    """One preconditioned MALA step for every particle (one gradient evaluation).

    :param generator: random generator on the particles' device (or a :class:`ParticleNoise`).
    :param theta: particles (P, D); ``log_prob`` (P,) and ``grad`` (P, D) at ``theta``.
    :param log_density: ``theta -> (log_prob, grad)`` of the current target.
    :param step_size: :math:`\\epsilon`, in units of the proposal covariance.
    :param cov: the proposal covariance :math:`M^{-1}` (:mod:`.proposal_covariance`), or a
        per-coordinate scale ``(D,)`` (a diagonal one).
    """
    cov = _covariance(cov)
    z = cov.sample(lambda shape: _draw(torch.randn, generator, shape, theta), theta)
    mean_fwd = theta + 0.5 * step_size ** 2 * cov.mul(grad)
    theta_new, diverged = _finite_or_start(mean_fwd + step_size * z, theta,
                                           torch.zeros_like(log_prob, dtype=torch.bool))
    log_prob_new, grad_new = log_density(theta_new)
    mean_bwd = theta_new + 0.5 * step_size ** 2 * cov.mul(grad_new)
    # log q(a | b) = -|a - mean(b)|^2_{Sigma^-1} / (2 eps^2) + const (the constants cancel).
    log_q_fwd = -0.5 * (z * cov.solve(z)).sum(-1)
    d = theta - mean_bwd
    log_q_bwd = -0.5 * (d * cov.solve(d)).sum(-1) / step_size ** 2
    log_ratio = (log_prob_new - log_prob + log_q_bwd - log_q_fwd).masked_fill(diverged, -float("inf"))
    return _accept(generator, log_ratio, theta, log_prob, grad, theta_new, log_prob_new, grad_new)


def hmc(generator: torch.Generator, theta: torch.Tensor, log_prob: torch.Tensor, grad: torch.Tensor,
        log_density: LogDensity, step_size: float, cov, num_leapfrog_steps: int = 10) -> MoveState:
    """One HMC transition for every particle (``num_leapfrog_steps`` gradient evaluations).

    Arguments as :func:`mala`, plus ``num_leapfrog_steps``. Momentum :math:`r \\sim
    \\mathcal N(0, M)` is drawn as :math:`M z` with :math:`z \\sim \\mathcal N(0, M^{-1})`; the
    position moves by :math:`\\epsilon M^{-1} r`.
    """
    cov = _covariance(cov)
    r = cov.solve(cov.sample(lambda shape: _draw(torch.randn, generator, shape, theta), theta))
    kinetic0 = 0.5 * (r * cov.mul(r)).sum(-1)
    q, lp, g = theta, log_prob, grad
    diverged = torch.zeros_like(log_prob, dtype=torch.bool)
    r = r + 0.5 * step_size * g
    for i in range(num_leapfrog_steps):
        q, diverged = _finite_or_start(q + step_size * cov.mul(r), theta, diverged)
        lp, g = log_density(q)
        r = r + (step_size if i < num_leapfrog_steps - 1 else 0.5 * step_size) * g
    kinetic1 = 0.5 * (r * cov.mul(r)).sum(-1)
    log_ratio = (lp - kinetic1 - (log_prob - kinetic0)).masked_fill(diverged, -float("inf"))
    return _accept(generator, log_ratio, theta, log_prob, grad, q, lp, g)


def adapt_step_size(step_size: float, accept_rate: float, target: float, rate: float = 1.0) -> float:
    """Multiplicative Robbins-Monro-style update ``eps * exp(rate * (accept - target))``: larger
    steps when accepting more than the target, smaller when less. Applied between move steps,
    so each step is still an exact :math:`\\pi_s`-invariant kernel."""
    return float(step_size * math.exp(rate * (accept_rate - target)))


KERNELS = {"mala": (mala, 0.574), "hmc": (hmc, 0.65)}
