"""Data-annealed SMC as ``init`` / ``step`` over a NamedTuple state.

One SMC step from level :math:`s_{t-1}` to :math:`s_t` (see :mod:`.data_schedules` for the path):

1. **reweight** with the likelihood of the newly included data, at the current particles,
   :math:`\\log w^i_t = \\log w^i_{t-1} + \\sum_b (c_b(s_t) - c_b(s_{t-1})) \\log p(D_b \\mid \\theta^i)`,
   where the schedule chooses :math:`s_t`;
2. accumulate the evidence, :math:`\\log Z_t = \\log Z_{t-1} + \\log \\sum_i W^i_{t-1} e^{\\Delta^i_t}`
   (:math:`W` the normalised weights), an unbiased estimate of :math:`Z_{s_t}/Z_{s_{t-1}}`;
3. **resample** when :math:`\\mathrm{ESS} = 1 / \\sum_i (W^i_t)^2` falls below ``ess_threshold * P``;
4. **move** every particle with ``num_mcmc_steps`` steps of a :math:`\\pi_{s_t}`-invariant kernel
   (MALA/HMC, :mod:`.kernels`) that uses only the data included so far; the step size follows
   the acceptance rate.

This is the "SMC sampler from an MCMC kernel" of Del Moral, Doucet and Jasra (2006) with the
data-annealing targets of Chopin (2002, IBIS) and Millard, Murphy, Green, Maskell (2026); with a
single batch it is BlackJAX's ``adaptive_tempered_smc``. The target is injected as two functions
(``log_prior`` and a pointwise ``log_lik``), so the core knows nothing about networks.

Under ``torch.distributed`` the particles are sharded: ``state.particles`` holds this rank's
share (:func:`~pyro_subnet.infer.distributed.shard` of ``P``) while ``state.log_weights`` holds
all ``P`` weights on every rank. Each step all-gathers the ``P`` incremental log-likelihoods of a
batch (``P`` numbers), so the schedule, the ESS, the normalised weights, the evidence
(a ``logsumexp`` over all ``P``: as stable as in one process) and the resampling ancestors are
computed identically on every rank; the population scale and the acceptance rate are
all-reduced; resampling all-gathers the particles and each rank takes the ancestors of its own
slots, so particles move between ranks. Random draws come from one generator shared by the ranks
(:class:`~.kernels.ParticleNoise`), so the run does not depend on the number of ranks beyond
rounding (which can still flip an accept/reject decision in a long run).

>>> from pyro_subnet.infer.smc import Adaptive, AnnealedTarget, DataPath, Move, init, step
>>> target = AnnealedTarget(lambda t: -0.5 * (t ** 2).sum(-1),
...                         lambda t, a, b: -0.5 * (t[:, :1] - torch.ones(1, b - a)) ** 2,
...                         DataPath(num_data=8, batch_size=2))
>>> g = torch.Generator().manual_seed(0)
>>> state = init(torch.randn(256, 1, generator=g))
>>> while state.level < target.path.num_batches:
...     state, info = step(g, state, target, Adaptive(0.5), Move("mala"))
>>> round(float(state.particles.mean()), 1)  # exact posterior mean 8/9
0.9
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import torch

from .. import distributed
from .kernels import KERNELS, ParticleNoise, adapt_step_size, hmc
from .proposal_covariance import DiagonalCovariance, ParticleCovariance
from .resampling import get_resampler
from .data_schedules import Adaptive, DataPath, Linear, log_ess

# the schedules are re-exported for the example above
__all__ = ["AnnealedTarget", "Move", "SMCInfo", "SMCState", "init", "resample", "step", "Adaptive", "DataPath",
           "Linear"]


class SMCState(NamedTuple):
    """What carries over from one SMC step to the next."""

    particles: torch.Tensor     # (P, D); under torch.distributed this rank's share of them
    log_weights: torch.Tensor   # (P,) all particles' weights, normalised: logsumexp = 0
    level: float                # position on the data path, in [0, num_batches]
    log_evidence: float         # log Z of the current partial posterior
    step_size: float            # move kernel step size (adapted)


class SMCInfo(NamedTuple):
    """What happened in one step (the diagnostics), kept apart from the state."""

    level: float
    num_data: int               # examples in the likelihood after this step
    ess: float                  # ESS after reweighting, before resampling (in particles)
    resampled: bool
    acceptance_rate: float      # mean MH acceptance probability over the move steps
    step_size: float            # step size used in the last move step
    log_evidence_increment: float
    num_mcmc_steps: int         # move steps taken (adaptive: until decorrelated)
    move_correlation: float     # correlation over particles of log pi before and after the moves
    grad_evals: int             # gradient passes over all particles
    data_grad_evals: int        # examples per particle touched by those gradient passes
    data_loglik_evals: int      # examples per particle touched by the reweighting


class AnnealedTarget:
    """The partial posteriors of a model, from two functions (and, optionally, a start density).

    :param log_prior: ``theta (P, D) -> (P,)``.
    :param log_lik: ``(theta (P, D), start, stop) -> (P, stop - start)`` pointwise log-likelihoods
        of the examples ``start:stop`` of the (already shuffled) data.
    :param path: the :class:`~.data_schedules.DataPath` of batches.
    :param log_reference: ``theta (P, D) -> (P,)``, a normalised density ``q`` the particles start
        from instead of the prior (e.g. a Laplace approximation). The path then bridges from ``q``
        to the posterior while the data come in,

        .. math:: \\pi_s(\\theta) \\propto q(\\theta)^{1 - s/B}\\, p(\\theta)^{s/B}
                  \\prod_b p(D_b \\mid \\theta)^{c_b(s)},

        which is ``q`` at level 0 and the posterior at level ``B``: the prior comes in at the pace
        of the data, as if each batch carried :math:`(p/q)^{1/B}` (:meth:`batch_loglik` adds
        :math:`(\\log p - \\log q)/B` to every batch), so the schedules, the weights and the
        evidence estimate (of :math:`p(D)`, since :math:`\\int q = 1`) are those of the plain path.
    """

    def __init__(self, log_prior: Callable, log_lik: Callable, path: DataPath,
                 log_reference: Optional[Callable] = None):
        self.log_prior, self.log_lik, self.path = log_prior, log_lik, path
        self.log_reference = log_reference

    def batch_loglik(self, theta: torch.Tensor) -> Callable[[int], torch.Tensor]:
        """``b -> (P,)`` summed log-likelihood of batch ``b`` at ``theta`` (no gradient); with a
        reference, plus the batch's share of :math:`\\log p - \\log q`."""
        share = []

        def f(b):
            with torch.no_grad():
                ll = self.log_lik(theta, *self.path.bounds(b)).sum(-1)
                if self.log_reference is None:
                    return ll
                if not share:
                    share.append((self.log_prior(theta) - self.log_reference(theta)) / self.path.num_batches)
                return ll + share[0]
        return f

    def log_density(self, level: float):
        """``theta -> (log pi_level (P,), gradient (P, D))`` and the number of examples it uses."""
        n, c = self.path.included(level)
        lam = min(1.0, level / self.path.num_batches)

        def f(theta):
            with torch.enable_grad():
                t = theta.detach().requires_grad_(True)
                lp = self.log_prior(t)
                if self.log_reference is not None:
                    lp = lam * lp + (1 - lam) * self.log_reference(t)
                if n > 0:
                    lp = lp + (self.log_lik(t, 0, n) * c.to(t)).sum(-1)
                (g,) = torch.autograd.grad(lp.sum(), t)
            return lp.detach(), g
        return f, n


COVARIANCES = ("curvature", "diagonal", "particles")


class Move:
    """A move kernel and its settings: ``"hmc"`` (default) or ``"mala"``.

    :param name: ``"hmc"`` (``num_leapfrog_steps`` gradients per step) or ``"mala"`` (one; its
        steps are diffusive, so in hundreds of dimensions it needs many more of them to move as
        far).
    :param num_mcmc_steps: kernel steps per SMC step.
    :param num_leapfrog_steps: HMC leapfrog steps per kernel step.
    :param target_accept: acceptance rate the step size is adapted to (default 0.574 for MALA,
        0.65 for HMC).
    :param max_mcmc_steps: most kernel steps per SMC step (default ``10 * num_mcmc_steps``;
        ``num_mcmc_steps``: a fixed number).
    :param target_correlation: the moves stop once the correlation over particles of the log
        density before and after them is at most this.
    :param covariance: the moves' proposal covariance (:mod:`.proposal_covariance`):
        ``"curvature"`` (per coordinate, the inverse of the particles' mean squared gradient of
        the target: the local curvature, what a network's posterior needs, whose particles spread
        over many modes), ``"diagonal"`` (the population's per-coordinate spread) or
        ``"particles"`` (its covariance shrunk a fifth of the way to the diagonal; the diagonal
        alone under ``torch.distributed``, where the particles are sharded).
    """

    def __init__(self, name: str = "hmc", num_mcmc_steps: int = 5, num_leapfrog_steps: int = 10,
                 target_accept: Optional[float] = None, max_mcmc_steps: Optional[int] = None,
                 target_correlation: float = 0.5, covariance: str = "curvature"):
        if name not in KERNELS:
            raise ValueError(f"move={name!r}: choose one of {sorted(KERNELS)}.")
        for arg, v in (("num_mcmc_steps", num_mcmc_steps), ("num_leapfrog_steps", num_leapfrog_steps)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be a positive integer, got {v!r}.")
        max_mcmc_steps = 10 * num_mcmc_steps if max_mcmc_steps is None else max_mcmc_steps
        if not isinstance(max_mcmc_steps, int) or max_mcmc_steps < num_mcmc_steps:
            raise ValueError(f"max_mcmc_steps must be an integer >= num_mcmc_steps ({num_mcmc_steps}), "
                             f"got {max_mcmc_steps!r}.")
        if not -1 <= target_correlation < 1:
            raise ValueError(f"target_correlation must be in [-1, 1), got {target_correlation!r}.")
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}.")
        fn, default_accept = KERNELS[name]
        self.covariance = covariance
        self.max_mcmc_steps = max_mcmc_steps
        self.target_correlation = float(target_correlation)
        self.name = name
        self.kernel = functools.partial(hmc, num_leapfrog_steps=num_leapfrog_steps) if fn is hmc else fn
        self.grads_per_step = num_leapfrog_steps if fn is hmc else 1
        self.num_mcmc_steps = num_mcmc_steps
        self.target_accept = default_accept if target_accept is None else target_accept

    def __repr__(self):
        extra = f", max_mcmc_steps={self.max_mcmc_steps}" if self.max_mcmc_steps > self.num_mcmc_steps else ""
        return f"Move({self.name!r}, num_mcmc_steps={self.num_mcmc_steps}{extra})"


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation over all ranks' particles of two ``(P_rank,)`` statistics."""
    a, b = distributed.all_gather_cat(a.double()), distributed.all_gather_cat(b.double())
    a, b = a - a.mean(), b - b.mean()
    denom = float((a.pow(2).sum() * b.pow(2).sum()).sqrt())
    return float((a * b).sum()) / denom if denom > 0 else 0.0


def init(particles: torch.Tensor, step_size: float = 0.5) -> SMCState:
    """Equally weighted particles at level 0 (draws from the prior, or from the target's
    ``log_reference``)."""
    if particles.dim() != 2:
        raise ValueError(f"particles must have shape (P, D), got {tuple(particles.shape)}.")
    p = particles.shape[0]
    log_w = torch.full((p,), -math.log(p), dtype=particles.dtype, device=particles.device)
    return SMCState(particles, log_w, 0.0, 0.0, float(step_size))


def resample(generator: torch.Generator, particles: torch.Tensor, log_weights: torch.Tensor, scheme="systematic"):
    """``(particles[ancestors], equal log-weights, ancestors)``. Under ``torch.distributed``
    ``particles`` is this rank's share and ``log_weights`` all ``P``: the ancestors are drawn
    identically on every rank, the particles all-gathered, and each rank keeps its own slots."""
    p = log_weights.shape[0]
    idx = get_resampler(scheme)(generator, torch.softmax(log_weights, 0), p)
    if distributed.is_active():
        mine = idx[distributed.shard(p)]
        new = distributed.all_gather_cat(particles)[mine.to(particles.device)]
    else:
        new = particles[idx]
    return new, torch.full_like(log_weights, -math.log(p)), idx


def _population_scale(particles: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """Weighted per-coordinate standard deviation over all ranks' particles, floored so no
    coordinate is frozen."""
    w = torch.softmax(log_weights, 0)[distributed.shard(log_weights.shape[0])][:, None]
    mean = distributed.all_reduce_sum((w * particles).sum(0))
    std = distributed.all_reduce_sum((w * (particles - mean) ** 2).sum(0)).sqrt()
    return std.clamp(min=1e-3 * float(std.median()) + 1e-12)


def _curvature_scale(grad: torch.Tensor, log_weights: torch.Tensor, part: slice) -> torch.Tensor:
    """Per-coordinate scale :math:`1 / \\sqrt{\\sum_i W_i\\, g_{ij}^2}` from the particles'
    gradients of the step's target (all ranks' particles): the inverse square root of the average
    local curvature, by the Fisher identity :math:`E_\\pi[g g^\\top] = E_\\pi[-\\nabla^2 \\log\\pi]`
    (see :mod:`.proposal_covariance`)."""
    w = torch.softmax(log_weights, 0)[part][:, None]
    fisher = distributed.all_reduce_sum((w * grad ** 2).sum(0))
    return fisher.clamp(min=1e-12).rsqrt()


def step(generator: torch.Generator, state: SMCState, target: AnnealedTarget, schedule, move: Move,
         ess_threshold: float = 0.5, resampling="systematic"):
    """One SMC step: reweight, resample if needed, move. Returns ``(SMCState, SMCInfo)``.

    :param generator: random generator on the particles' device.
    :param state: the current :class:`SMCState`.
    :param target: the :class:`AnnealedTarget`.
    :param schedule: :class:`~.data_schedules.Adaptive` or :class:`~.data_schedules.Linear`.
    :param move: a :class:`Move`.
    :param ess_threshold: resample when ESS < ``ess_threshold * P``.
    :param resampling: scheme name or function (see :mod:`.resampling`).
    """
    theta, log_w = state.particles, state.log_weights
    p = log_w.shape[0]
    part = distributed.shard(p)
    if theta.shape[0] != part.stop - part.start:
        raise ValueError(f"step: this rank holds {theta.shape[0]} particles, but its share of the {p} weights is "
                         f"{part.stop - part.start}; start from annealed.init(all particles) and keep "
                         "particles[distributed.shard(P)].")
    local_ll = target.batch_loglik(theta)
    n_eval_data = 0

    def batch_ll(b):  # every rank sees all P incremental log-likelihoods
        nonlocal n_eval_data
        start, stop = target.path.bounds(b)
        n_eval_data += stop - start
        return distributed.all_gather_cat(local_ll(b))

    level, inc, _ = schedule(log_w, state.level, batch_ll, target.path)
    log_z_inc = float(torch.logsumexp(log_w + inc, 0))
    log_w = log_w + inc
    log_w = log_w - torch.logsumexp(log_w, 0)
    ess = float(log_ess(log_w).exp())
    # The population's spread is read before resampling (which duplicates particles); the
    # curvature comes from the gradients the first move needs, after it.
    scale = _population_scale(theta, log_w)
    if move.covariance == "particles" and not distributed.is_active():
        cov = ParticleCovariance(theta, log_w, scale)
    else:
        cov = DiagonalCovariance(scale)
    # The adaptive schedule stops exactly at the threshold: the small tolerance makes it resample.
    resampled = ess < ess_threshold * p * (1 + 1e-3)
    if resampled:
        theta, log_w, _ = resample(generator, theta, log_w, resampling)

    log_density, n = target.log_density(level)
    lp, grad = log_density(theta)
    if move.covariance == "curvature":
        # Never wider than the spread: where the gradients vanish (a flat direction, or a
        # coordinate the data barely touch) the curvature alone would propose steps without bound.
        cov = DiagonalCovariance(torch.minimum(_curvature_scale(grad, log_w, part), scale))
    step_size, accepts = state.step_size, []
    noise = ParticleNoise(generator, p, part)
    lp_start = lp
    while True:
        for _ in range(move.num_mcmc_steps):
            out = move.kernel(noise, theta, lp, grad, log_density, step_size, cov)
            theta, lp, grad = out.theta, out.log_prob, out.grad
            rate = float(distributed.all_reduce_sum(out.accept_prob.sum())) / p
            accepts.append(rate)
            used_step = step_size
            step_size = adapt_step_size(step_size, rate, move.target_accept)
        correlation = _correlation(lp_start, lp)
        if correlation <= move.target_correlation or len(accepts) + move.num_mcmc_steps > move.max_mcmc_steps:
            break
    grad_evals = 1 + len(accepts) * move.grads_per_step
    info = SMCInfo(level, n, ess, resampled, sum(accepts) / len(accepts), used_step, log_z_inc, len(accepts),
                   correlation, grad_evals, grad_evals * n, n_eval_data)
    return SMCState(theta, log_w, level, state.log_evidence + log_z_inc, step_size), info
