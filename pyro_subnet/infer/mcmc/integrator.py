"""The SGHMC update on flat weights: ``init(theta) -> SGHMCState``, ``step(...) -> (state, info)``.

Chen, Fox & Guestrin, *Stochastic Gradient Hamiltonian Monte Carlo* (ICML 2014), eq. (15), in
the velocity form with a diagonal preconditioner ``G`` (a mass matrix ``M = G^{-1}``):

.. math::

    v &\\leftarrow (1 - \\alpha) v - \\epsilon\\, G \\nabla \\tilde U(\\theta)
        + \\sqrt{2 \\alpha \\epsilon G}\\; \\xi, \\qquad \\xi \\sim \\mathcal N(0, I), \\\\
    \\theta &\\leftarrow \\theta + v,

with ``U = -log p(theta) - (N/B) sum_{n in batch} log p(y_n | theta)`` the mini-batch potential,
``epsilon`` the step size (the learning rate, ``eta`` in Chen et al.) and ``alpha`` the friction
(``1 - momentum``). When the step
size changes along a schedule the velocity is rescaled by ``sqrt(eps_new / eps_old)`` (it is
``sqrt(eps)`` times the momentum). A mask (pruning) zeroes weights and their velocity.

The gradient-noise correction ``B_hat`` of Chen et al. is taken as 0: the kernel's mini-batches
are drawn without replacement, a fresh permutation every epoch, so their errors cancel over an
epoch and subtracting their one-step variance over-corrects (the chain's variances come out too
small; ``docs/measured.md``); :mod:`.step_size` keeps the step small enough that the noise does not
matter instead.

**Divergences.** A step whose potential is not finite, or whose mini-batch potential has jumped
by more than ``max(DIVERGENCE_ENERGY, 50 x`` the typical step-to-step change``)`` above the
last one (Stan's and Pyro's HMC use an energy error of 1000 nats), is undone: the chain goes
back to the position before the last move, with zero velocity. A chain therefore never stays at
a non-finite or runaway point; the kernel counts these steps and reacts (:mod:`.step_size`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .preconditioners import PreconditionerState


class SGHMCState(NamedTuple):
    theta: torch.Tensor                 # (D,) position (unconstrained weights)
    velocity: torch.Tensor              # (D,)
    precond: PreconditionerState
    step_size: float                    # step size of the last step
    noise: Optional[torch.Tensor]       # (D,) standard normal draw of the last step
    previous: Optional[torch.Tensor] = None   # (D,) position before the last move (where a divergence returns)
    last_potential: Optional[float] = None    # mini-batch U at ``previous``
    energy_scale: float = 0.0           # running mean |U_t - U_{t-1}| (the divergence threshold's scale)


class SGHMCInfo(NamedTuple):
    potential: float                    # mini-batch estimate of U at the old position
    diverging: bool                     # the last move was undone (non-finite or an energy jump)


#: Jump of the mini-batch potential (nats) above which a move counts as divergent, at the least.
DIVERGENCE_ENERGY = 1000.0
_ENERGY_RATE = 0.05


def init(theta: torch.Tensor, preconditioner) -> SGHMCState:
    theta = theta.detach()
    return SGHMCState(theta, torch.zeros_like(theta), preconditioner.init(theta), 0.0, None)


def _undo(state: SGHMCState) -> SGHMCState:
    """Back to the position before the last move, at rest."""
    theta = state.theta if state.previous is None else state.previous
    return state._replace(theta=theta, velocity=torch.zeros_like(state.velocity), noise=None, previous=None,
                          last_potential=None)


def step(state: SGHMCState, potential_and_grad, step_size: float, friction: float, preconditioner,
         adapt: bool, mask: Optional[torch.Tensor] = None):
    """One SGHMC step.

    :param potential_and_grad: ``theta -> (U, grad U)`` on a fresh mini-batch.
    :param step_size: ``epsilon`` for this step.
    :param friction: ``alpha`` in ``(0, 1]``.
    :param preconditioner: object with ``update(state, grad, noise, noise_scale)``.
    :param adapt: update the preconditioner with this step's gradient.
    :param mask: ``(D,)`` 0/1 tensor of weights kept (``None``: all).
    """
    u, grad = potential_and_grad(state.theta)
    if not math.isfinite(u):
        return _undo(state), SGHMCInfo(u, True)
    jump = 0.0 if state.last_potential is None else u - state.last_potential
    if jump > max(DIVERGENCE_ENERGY, 50.0 * state.energy_scale):
        return _undo(state), SGHMCInfo(u, True)
    energy_scale = abs(jump) if state.energy_scale == 0.0 else (
        (1 - _ENERGY_RATE) * state.energy_scale + _ENERGY_RATE * abs(jump))
    pre = state.precond
    if adapt and state.noise is not None:
        pre = preconditioner.update(pre, grad, state.noise, torch.sqrt(2 * friction * state.step_size * pre.scale))
    elif adapt:
        pre = preconditioner.update(pre, grad, None, None)
    velocity = state.velocity
    decay = 1 - friction
    if state.step_size > 0 and step_size != state.step_size:
        decay = decay * math.sqrt(step_size / state.step_size)
    noise = torch.randn_like(state.theta)
    if preconditioner.adaptive:
        g = pre.scale
        velocity = decay * velocity - step_size * g * grad + torch.sqrt(2 * friction * step_size * g) * noise
    else:   # G = I: scalar coefficients, fused
        velocity = torch.add(torch.add(velocity * decay, grad, alpha=-step_size), noise,
                             alpha=math.sqrt(2 * friction * step_size))
    theta = state.theta + velocity
    if mask is not None:
        theta, velocity = theta * mask, velocity * mask
    # One reduction catches a non-finite gradient, noise or position (NaN and inf propagate).
    if not math.isfinite(float(velocity.sum())):
        return _undo(state), SGHMCInfo(u, True)
    return SGHMCState(theta, velocity, pre, step_size, noise, state.theta, u, energy_scale), SGHMCInfo(u, False)
