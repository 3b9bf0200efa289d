"""Step-size adaptation for SGHMC during warm-up: ``init(step_size) -> StepSizeState``,
``observe(state, ...)``, ``propose(state, ...) -> step size``.

SGHMC in the velocity form of :mod:`.integrator` has two errors that grow with the step size
``epsilon``, and the adaptation keeps both small:

**Gradient noise.** A mini-batch gradient adds ``epsilon^2 G V G`` to the velocity's variance per
step (``V`` the covariance of the stochastic gradient, ``G`` the preconditioner) on top of the
injected ``2 alpha epsilon G``, which inflates the stationary variance of coordinate ``j`` by up to
a factor ``1 + kappa_j`` with

.. math::

    \\kappa_j = \\frac{\\epsilon\\, G_j V_j}{2 \\alpha}

(less when, as here, the batches of an epoch are disjoint and their errors cancel). The
adaptation holds the ``quantile`` (0.9) of ``kappa`` at ``noise_ratio`` (0.2). ``V`` is estimated
per step from two halves of the mini-batch: for the half-batch gradients ``g_1, g_2`` (each
scaled to the full data) ``E[(g_1 - g_2)^2 / 4] = V``, exactly and without per-example
gradients; an exponential average over warm-up smooths it. Full-batch gradients have ``V = 0``.

**Discretisation.** On a quadratic potential of curvature ``lambda`` the scheme is stable for
``epsilon lambda < 2 (2 - alpha)`` and its stationary variance is about ``1 / (lambda (1 -
epsilon lambda / 4))`` (for ``alpha`` up to 0.5). The adaptation keeps ``epsilon lambda_max <=
curvature_ratio`` (0.25: a variance error of about 6% in the stiffest direction, far less in the
rest), with ``lambda_max`` the largest eigenvalue of ``G^{1/2} H G^{1/2}`` found by a few power
iterations of Hessian-vector products of the mini-batch potential, repeated during warm-up as the
chain moves (the first estimate is at the starting point, where the curvature can be far from the
posterior's).

**Friction.** With ``friction="auto"`` the kernel sets :math:`\\alpha` with the step size. The
velocity form is underdamped Langevin dynamics with time step :math:`h = \\sqrt\\epsilon` and
friction coefficient :math:`\\gamma = \\alpha / h`; a mode of curvature :math:`\\lambda` is critically
damped at :math:`\\gamma = 2\\sqrt\\lambda` and decorrelates slowest when overdamped. The slowest mode
is the flattest one, and in a Bayesian network it is at least as curved as the prior (the data add
curvature): with :math:`\\lambda_{\\min}` the smallest prior precision in the preconditioned
coordinates (:math:`\\min_j G_j p_j`),

.. math:: \\alpha = \\sqrt{\\epsilon \\lambda_{\\min}},

half the critical value there (underdamped, so the flattest directions move ballistically) and
below it in every stiffer direction, clipped to ``[MIN_FRICTION, MAX_FRICTION]``. A fixed
``alpha = 0.1`` is overdamped by orders of magnitude in the flat directions of a network posterior
whose stiffest curvature is ``N / sigma^2`` (the step size follows the stiffest): those directions,
which set the predictive spread away from the data, then barely move in a chain of thousands of
steps. Where mini-batch gradient noise would cut the step size below the curvature bound, the
friction is raised instead (up to ``MAX_FRICTION``) so that the noise stays within its bound at
that step (:func:`propose`).

The step size is the smaller of the two bounds. A divergence during warm-up (a non-finite
potential or an energy jump, see :mod:`.integrator`) halves a ``backoff`` factor that multiplies
every later proposal. After warm-up the step size, the gradient-noise estimate and the
preconditioner are frozen, so the chain is a homogeneous Markov chain targeting the posterior.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

import torch

#: The largest ``epsilon`` a proposal may take: a guard against a curvature estimate of ~0 (a
#: flat start) with exact gradients, where neither bound binds.
MAX_STEP_SIZE = 1.0

#: Bounds of the derived friction: below ``MIN_FRICTION`` the velocity would need more than
#: ~1000 steps to forget its start; ``MAX_FRICTION`` keeps the dynamics second order.
MIN_FRICTION, MAX_FRICTION = 1e-3, 0.5

#: The friction where no prior precision bounds the flattest curvature (a model without a fixed
#: Normal prior on every weight).
FALLBACK_FRICTION = 0.1


class StepSizeState(NamedTuple):
    step_size: float                      # the current proposal
    grad_noise: Optional[torch.Tensor]    # (D,) running estimate of V (None: no estimate yet)
    noise_count: int                      # observations in grad_noise (bias correction of the EMA)
    lambda_max: Optional[float]           # largest eigenvalue of G^1/2 H G^1/2 at the last estimate
    eigvec: Optional[torch.Tensor]        # its eigenvector, the next power iteration's start
    backoff: float                        # product of the halvings after divergences


def init(step_size: float) -> StepSizeState:
    return StepSizeState(float(step_size), None, 0, None, None, 1.0)


#: Decay of the running average of the gradient noise (its memory is about 50 steps).
NOISE_DECAY = 0.98


def observe_noise(state: StepSizeState, half_difference: torch.Tensor) -> StepSizeState:
    """Fold one estimate ``(g_1 - g_2)^2 / 4`` of the gradient noise into the running average."""
    obs = half_difference.detach()
    beta = NOISE_DECAY
    v = obs * (1 - beta) if state.grad_noise is None else beta * state.grad_noise + (1 - beta) * obs
    return state._replace(grad_noise=v, noise_count=state.noise_count + 1)


def grad_noise(state: StepSizeState) -> Optional[torch.Tensor]:
    """The bias-corrected running estimate of ``V`` (``None`` before any observation)."""
    if state.grad_noise is None:
        return None
    return state.grad_noise / (1 - NOISE_DECAY ** state.noise_count)


def lambda_max(hvp: Callable[[torch.Tensor], torch.Tensor], scale: torch.Tensor, start: Optional[torch.Tensor],
               num_iterations: int = 10):
    """Largest eigenvalue of ``G^{1/2} H G^{1/2}`` by power iteration (``hvp(v) = H v``), from
    ``start`` (the last estimate's eigenvector) or a random direction. Returns ``(lambda, v)``;
    a non-finite product gives ``(inf, start)`` so the caller backs off."""
    root = scale.sqrt()
    v = torch.randn_like(scale) if start is None else start.clone()
    v = v / v.norm().clamp_min(1e-30)
    lam = 0.0
    for _ in range(num_iterations):
        w = root * hvp(root * v)
        if not bool(torch.isfinite(w).all()):
            return math.inf, start
        lam = float(torch.dot(v, w))        # Rayleigh quotient (H may be indefinite away from the mode)
        norm = w.norm()
        if float(norm) == 0.0:
            return 0.0, v
        v = w / norm
    return abs(lam), v


def observe_curvature(state: StepSizeState, lam: float, eigvec) -> StepSizeState:
    return state._replace(lambda_max=lam, eigvec=eigvec)


def backoff(state: StepSizeState, factor: float = 0.5) -> StepSizeState:
    """After a divergence: every later proposal is ``factor`` times smaller."""
    return state._replace(backoff=state.backoff * factor, step_size=state.step_size * factor)


def friction_for(step_size: float, curvature_floor: float) -> float:
    """:math:`\\alpha = \\sqrt{\\epsilon \\lambda_{\\min}}` clipped to ``[MIN_FRICTION, MAX_FRICTION]`` (module docstring)."""
    return min(max(math.sqrt(max(step_size, 0.0) * curvature_floor), MIN_FRICTION), MAX_FRICTION)


def propose(state: StepSizeState, scale: torch.Tensor, friction: float, noise_ratio: float = 0.2,
            curvature_ratio: float = 0.25, quantile: float = 0.9,
            curvature_floor: Optional[float] = None) -> Tuple[StepSizeState, float]:
    """The step size of both bounds (see the module docstring), times the back-off factor, and the
    friction: ``friction`` as given, or with ``curvature_floor`` (:math:`\\lambda_{\\min}`) the
    derived one: :func:`friction_for` of the curvature bound's step size, raised where the
    gradient-noise bound would otherwise cut that step (:math:`\\alpha \\ge \\epsilon q / (2 \\cdot
    \\text{noise\\_ratio})`; in those overdamped directions the mixing rate
    :math:`\\epsilon\\lambda / \\alpha` is set by the noise whatever the friction, and the larger
    step moves the stiff ones faster)."""
    fixed = [MAX_STEP_SIZE]
    if state.lambda_max is not None:
        if not math.isfinite(state.lambda_max):
            fixed.append(state.step_size * 0.5)
        elif state.lambda_max > 0:
            fixed.append(curvature_ratio / state.lambda_max)
    q = None
    v = grad_noise(state)
    if v is not None:
        gv = (scale * v).float()
        q = float(torch.quantile(gv, quantile)) if gv.numel() > 1 else float(gv.reshape(-1)[0])
        q = q if q > 0 else None
    if curvature_floor is not None:
        eps = min(fixed)
        alpha = math.sqrt(eps * state.backoff * curvature_floor)     # at the step to be taken
        if q is not None:
            alpha = max(alpha, eps * q / (2 * noise_ratio))           # (both bounds before the back-off)
        friction = min(max(alpha, MIN_FRICTION), MAX_FRICTION)
    bounds = fixed + ([] if q is None else [noise_ratio * 2 * friction / q])
    return state._replace(step_size=min(bounds) * state.backoff), friction


def noise_ratio(step_size: float, scale: torch.Tensor, grad_noise_var: Optional[torch.Tensor], friction: float):
    """``kappa = epsilon G V / (2 alpha)`` per coordinate (``None`` without a noise estimate)."""
    if grad_noise_var is None:
        return None
    return step_size * scale * grad_noise_var / (2 * friction)


def drift_z_score(values, first: float = 0.1, last: float = 0.5, num_batches: int = 10) -> float:
    """Geweke's (1992) convergence diagnostic on one chain's trace: the difference of the means
    of its first ``first`` and last ``last`` fractions, in standard errors (batch means, so that
    autocorrelation widens them). ``|z| > 4``: the trace still drifts (the chain has not reached
    its stationary distribution when the draws started). ``nan`` for traces too short to tell."""
    x = torch.as_tensor(values, dtype=torch.float64)
    n = x.numel()
    a, b = x[: int(first * n)], x[n - int(last * n):]
    if a.numel() < num_batches or b.numel() < num_batches:
        return math.nan

    def mean_and_var(part):
        k = part.numel() // num_batches
        means = part[: k * num_batches].reshape(num_batches, k).mean(1)
        return float(part.mean()), float(means.var()) / num_batches

    (ma, va), (mb, vb) = mean_and_var(a), mean_and_var(b)
    if va + vb == 0:
        return 0.0 if ma == mb else math.inf
    return (ma - mb) / math.sqrt(va + vb)
