"""The first part of SGHMC's warm-up: Adam on the mini-batch potential, ``init(theta) ->
AdamState``, ``step(state, potential_and_grad, lr) -> (state, potential)``.

A chain started from a prior draw spends most of a short warm-up climbing to where the posterior
has its mass: SGHMC's step size is bounded by the posterior's stiffest direction and by the
mini-batch noise (:mod:`.step_size`), so it climbs the flat directions slowly. An optimiser has
no such bound, and warm-up draws are discarded anyway, so the first fraction of warm-up takes
Adam steps (Kingma & Ba, 2015) toward a mode, the usual start of SG-MCMC in deep learning (e.g.
Zhang et al., 2020); the rest of warm-up then adapts the step size and the preconditioner where
the chain will sample.

A learned noise scale is held small for the first part of the optimiser phase, as in
:func:`~pyro_subnet.infer.fit_map`: climbing the weights and the noise together from a noise of the
targets' size, Adam settles in the mode where the noise explains the data and the weights stay near
the prior. Once the weights fit the data the noise restarts at the scale of their residuals.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..map import NOISE_WARMUP_SCALE

#: The fraction of the optimiser phase with a learned noise held at :func:`held_noise`.
NOISE_HOLD_FRACTION = 0.9


class AdamState(NamedTuple):
    theta: torch.Tensor       # (D,) position
    mean: torch.Tensor        # (D,) first-moment EMA of the gradient
    second: torch.Tensor      # (D,) second-moment EMA
    count: int


def init(theta: torch.Tensor) -> AdamState:
    theta = theta.detach()
    return AdamState(theta, torch.zeros_like(theta), torch.zeros_like(theta), 0)


def step(state: AdamState, potential_and_grad, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """One Adam step downhill on ``U``; a non-finite potential or gradient leaves the position."""
    u, grad = potential_and_grad(state.theta)
    if not (math.isfinite(u) and bool(torch.isfinite(grad).all())):
        return state, u
    b1, b2 = betas
    count = state.count + 1
    mean = b1 * state.mean + (1 - b1) * grad
    second = b2 * state.second + (1 - b2) * grad * grad
    denom = (second / (1 - b2 ** count)).sqrt().add_(eps)
    theta = state.theta - lr * (mean / (1 - b1 ** count)) / denom
    return AdamState(theta, mean, second, count), u


def held_noise(current: float, y: torch.Tensor) -> float:
    """The noise scale held while the weights climb: ``min(current, NOISE_WARMUP_SCALE std(y))``."""
    return min(current, NOISE_WARMUP_SCALE * float(y.std())) if y.numel() > 1 else current


def holding_last(potential_and_grad):
    """``potential_and_grad`` with the last coordinate's gradient zeroed, so Adam leaves it."""
    def held(theta):
        u, grad = potential_and_grad(theta)
        grad = grad.clone()
        grad[-1:] = 0
        return u, grad
    return held
