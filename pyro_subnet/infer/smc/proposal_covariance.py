"""The covariance :math:`\\Sigma = M^{-1}` that preconditions the particle moves, from the particles.

The moves of :mod:`.kernels` need three operations on :math:`\\Sigma`: the product
:math:`\\Sigma v`, a draw :math:`z \\sim \\mathcal N(0, \\Sigma)` and :math:`\\Sigma^{-1} v`.

* :class:`DiagonalCovariance`: :math:`\\Sigma = \\mathrm{diag}(s^2)` with ``s`` the population's
  per-coordinate standard deviation (the usual SMC choice; Buchholz, Chopin and Jacob 2021), or
  (``covariance="curvature"``, the default of the moves) with
  :math:`s_j = (\\sum_i W_i\\, g_{ij}^2)^{-1/2}`, :math:`g_i = \\nabla \\log \\pi_t(\\theta_i)`
  the particles' gradients of the step's target. By the Fisher identity
  :math:`E_\\pi[g g^\\top] = E_\\pi[-\\nabla^2 \\log \\pi]`, :math:`s_j^{-2}` estimates the
  average local curvature along coordinate ``j`` (for a Gaussian target, the diagonal of its
  precision, so :math:`s_j` is the conditional standard deviation). A network's particles spread
  over many modes (its symmetries, and the modes the data leave open), so their spread can be
  many times the width of any one mode: preconditioned by the spread, the moves' step size
  shrinks until a step fits inside a mode and the particles crawl; preconditioned by the
  curvature, a step is a fraction of the local width whatever the spread. It costs nothing: the
  gradients are those the first move needs anyway.
* :class:`ParticleCovariance`: the population's own covariance, shrunk toward its diagonal,

  .. math::

      \\Sigma = \\gamma\\, \\mathrm{diag}(s^2) + (1 - \\gamma)\\, U^\\top U, \\qquad
      U_i = \\sqrt{W_i}\\, (\\theta_i - \\bar\\theta),

  a dense ``D x D`` matrix where there are at least as many particles as weights, else of rank up
  to ``P`` on top of the diagonal, so it costs :math:`O(P^2 D)` per product and never a
  :math:`D \\times D` matrix. Draws are :math:`\\sqrt\\gamma\\, s \\odot \\xi_1 + \\sqrt{1-\\gamma}\\,
  U^\\top \\xi_2` and the inverse is Woodbury's,
  :math:`\\Sigma^{-1} = A^{-1} - A^{-1} U^\\top K^{-1} U A^{-1}` with :math:`A = \\gamma\\,
  \\mathrm{diag}(s^2)`, :math:`K = I / (1 - \\gamma) + U A^{-1} U^\\top` (``P x P``). A network's
  posterior has strong correlations between weights (a unit's incoming and outgoing weights
  trade off); a diagonal mass matrix lets the moves advance only as far as the narrowest
  conditional, the particle covariance along the directions the particles already span.

Both are fixed during the moves of one SMC step (computed before them), so every move is an
exact Metropolis-Hastings kernel for the step's target.
"""

from __future__ import annotations

import math

import torch


class DiagonalCovariance:
    """:math:`\\Sigma = \\mathrm{diag}(s^2)`, ``scale = s`` of shape ``(D,)``."""

    def __init__(self, scale: torch.Tensor):
        self.scale = scale
        self.var = scale ** 2

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        return self.var * v

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        return v / self.var

    def sample(self, draw, like: torch.Tensor) -> torch.Tensor:
        """``draw(shape) -> standard normal`` of that shape; returns ``(P, D)`` draws of N(0, Sigma)."""
        return self.scale * draw(like.shape)


class ParticleCovariance(DiagonalCovariance):
    """:math:`\\gamma\\,\\mathrm{diag}(s^2) + (1-\\gamma) U^\\top U` from the weighted particles:
    as a dense ``D x D`` matrix with its Cholesky factor where ``D <= P``, else in the low-rank
    (Woodbury) form.

    :param particles: ``(P, D)`` (all of them, not a rank's share).
    :param log_weights: ``(P,)`` normalised log-weights.
    :param scale: the floored per-coordinate standard deviation ``s`` (``(D,)``).
    :param shrinkage: :math:`\\gamma` in ``(0, 1]``.
    """

    def __init__(self, particles: torch.Tensor, log_weights: torch.Tensor, scale: torch.Tensor,
                 shrinkage: float = 0.2):
        super().__init__(scale)
        if not 0 < shrinkage <= 1:
            raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage!r}.")
        self.shrinkage = float(shrinkage)
        w = torch.softmax(log_weights, 0)
        mean = (w[:, None] * particles).sum(0)
        self.factor = w.sqrt()[:, None] * (particles - mean)                 # U, (P, D)
        p, d = self.factor.shape
        self.dense = d <= p
        if self.dense:
            self.matrix = torch.diag(self.shrinkage * self.var) + (1 - self.shrinkage) * self.factor.T @ self.factor
            self.chol = torch.linalg.cholesky(self.matrix)
        else:
            self.a_inv = 1.0 / (self.shrinkage * self.var)                    # A^{-1}, (D,)
            k = torch.eye(p, dtype=particles.dtype, device=particles.device) / (1 - self.shrinkage) \
                + (self.factor * self.a_inv) @ self.factor.T if self.shrinkage < 1 else None
            self.k_chol = None if k is None else torch.linalg.cholesky(k)

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return v @ self.matrix
        return self.shrinkage * self.var * v + (1 - self.shrinkage) * (v @ self.factor.T) @ self.factor

    def solve(self, v: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return torch.cholesky_solve(v.T, self.chol).T
        av = v * self.a_inv
        if self.k_chol is None:
            return av
        inner = torch.cholesky_solve((av @ self.factor.T).T, self.k_chol).T      # K^{-1} U A^{-1} v
        return av - (inner @ self.factor) * self.a_inv

    def sample(self, draw, like: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return draw(like.shape) @ self.chol.T
        diag = math.sqrt(self.shrinkage) * self.scale * draw(like.shape)
        low_rank = math.sqrt(1 - self.shrinkage) * draw((like.shape[0], self.factor.shape[0])) @ self.factor
        return diag + low_rank
