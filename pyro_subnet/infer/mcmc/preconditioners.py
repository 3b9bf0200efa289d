"""Diagonal preconditioners ``G`` for SGHMC: ``init(theta) -> state``, ``update(state, grad,
noise, noise_scale) -> state``, ``state.scale`` = the diagonal of ``G``.

SGHMC with a constant diagonal preconditioner ``G`` (a mass matrix ``M = G^{-1}``) samples the
target exactly in the small-step limit; a preconditioner that keeps changing adds a bias term
(``Gamma`` in Ma et al., 2015) that pSGLD (Li et al., 2016) and Ke & Fan (2022) neglect. The
kernel therefore adapts ``G`` during warm-up only by default (like NUTS's mass matrix) and freezes
it afterwards, which removes that bias.

Both adaptive preconditioners set ``G_j`` proportional to ``1 / sqrt(h_j)`` for a running estimate
``h_j`` of the curvature of the potential in coordinate ``j``, normalised so that the median
weight gets ``G = 1`` (the step size keeps its meaning) and clamped to ``[min_gain, max_gain]``:

* ``"rmsprop"`` (pSGLD, Li et al., AAAI 2016): ``h = EMA(g^2)``, the squared stochastic gradient.
* ``"vb"`` (Ke & Fan, 2022: the adaptive variational-Bayes update is SGHMC preconditioned by the
  mean-field standard deviations): ``h = EMA(xi_prev * g / c)`` with ``xi_prev`` the standard
  normal noise of the previous step and ``c = sqrt(2 alpha eps G)`` its scale in the position.
  By Stein's identity ``E[xi g(theta + c xi)] = c E[d^2 U / d theta^2]``, so ``h`` is the
  reparameterisation-gradient estimate of the diagonal Hessian that the mean-field VB update
  uses, and ``G_j`` is proportional to the mean-field posterior standard deviation
  ``1 / sqrt(h_j)`` (the ``tau`` of Ke & Fan, there squashed to ``(0, 1)``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PreconditionerState(NamedTuple):
    scale: torch.Tensor       # (D,) diagonal of G
    curvature: torch.Tensor   # (D,) running curvature estimate h
    count: int                # updates so far (for bias correction of the EMA)


def _normalise(h: torch.Tensor, min_gain: float, max_gain: float) -> torch.Tensor:
    positive = h[h > 0]
    if positive.numel() == 0:
        return torch.ones_like(h)
    ref = positive.median()
    # A noisy estimate can be <= 0 (Stein) or tiny: floor it relative to the median.
    root = h.clamp_min(ref * min_gain ** 2).sqrt()
    return (ref.sqrt() / root).clamp(min_gain, max_gain)


class Identity:
    """No preconditioning: ``G = I``."""

    adaptive = False

    def init(self, theta: torch.Tensor) -> PreconditionerState:
        return PreconditionerState(torch.ones_like(theta), torch.zeros_like(theta), 0)

    def update(self, state, grad, noise, noise_scale):
        return state


class RMSprop(Identity):
    """pSGLD's preconditioner: ``h = EMA_beta(g^2)``, ``G ~ 1 / sqrt(h)``.

    :param beta: EMA decay.
    :param min_gain: lower clamp of ``G``.
    :param max_gain: upper clamp of ``G``.
    :param min_count: observations before ``G`` leaves ``I``.
    """

    adaptive = True

    def __init__(self, beta: float = 0.99, min_gain: float = 1e-2, max_gain: float = 10.0, min_count: int = 100):
        self.beta, self.min_gain, self.max_gain, self.min_count = beta, min_gain, max_gain, min_count

    def _observe(self, grad, noise, noise_scale):
        return grad * grad

    def update(self, state, grad, noise, noise_scale):
        obs = self._observe(grad, noise, noise_scale)
        if obs is None:
            return state
        h = self.beta * state.curvature + (1 - self.beta) * obs
        count = state.count + 1
        if count < self.min_count:             # too few observations: keep G = I
            return PreconditionerState(state.scale, h, count)
        h_hat = h / (1 - self.beta ** count)   # bias-corrected EMA (Adam)
        return PreconditionerState(_normalise(h_hat, self.min_gain, self.max_gain), h, count)


class VariationalBayes(RMSprop):
    """Ke & Fan's variational-Bayes preconditioner: ``h = EMA_beta(xi_prev * g / c)`` (Stein's
    identity), ``G ~ 1 / sqrt(h)`` = the mean-field VB standard deviation up to a constant.

    :param beta: EMA decay (the Stein estimate is noisy: keep it close to 1).
    :param min_gain: lower clamp of ``G``.
    :param max_gain: upper clamp of ``G``.
    :param min_count: observations before ``G`` leaves ``I``.
    """

    def __init__(self, beta: float = 0.995, min_gain: float = 1e-2, max_gain: float = 10.0, min_count: int = 200):
        super().__init__(beta, min_gain, max_gain, min_count)

    def _observe(self, grad, noise, noise_scale):
        if noise is None:
            return None
        return noise * grad / noise_scale


def make_preconditioner(spec, **options):
    """``None`` -> :class:`Identity`, ``"rmsprop"`` -> :class:`RMSprop`, ``"vb"`` ->
    :class:`VariationalBayes`, or an object with ``init``/``update`` returned as is."""
    if spec is None:
        return Identity()
    if isinstance(spec, str):
        table = {"rmsprop": RMSprop, "vb": VariationalBayes}
        if spec not in table:
            raise ValueError(f"Unknown preconditioner {spec!r}: use 'vb', 'rmsprop' or None.")
        return table[spec](**options)
    if not (hasattr(spec, "init") and hasattr(spec, "update")):
        raise ValueError("preconditioner must be 'vb', 'rmsprop', None, or an object with init/update.")
    return spec
