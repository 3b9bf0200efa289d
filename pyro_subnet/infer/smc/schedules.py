"""The path of partial posteriors and the rules that walk along it.

The data, in a fixed random order, are split into batches :math:`D_0, \\dots, D_{B-1}`. A *level*
:math:`s \\in [0, B]` names the target

.. math::

    \\pi_s(\\theta) \\propto p(\\theta) \\prod_{b} p(D_b \\mid \\theta)^{c_b(s)},
    \\qquad c_b(s) = \\min(1, \\max(0, s - b)),

so batches below :math:`\\lfloor s \\rfloor` are fully in, the newest one enters with the tempered
fraction :math:`s - \\lfloor s \\rfloor` and the rest are out. With one batch holding all the data
(:math:`B = 1`) this is plain likelihood tempering with :math:`\\lambda = s`, the full-batch
baseline. Moving from level :math:`s` to :math:`s'` multiplies the particle weights by
:math:`\\prod_b p(D_b \\mid \\theta)^{c_b(s') - c_b(s)}`, which only needs the batches whose
coefficient changes: that is where data annealing saves work (Millard, Murphy, Green, Maskell 2026,
*Investigating Batch Inference in a Sequential Monte Carlo Framework for Neural Networks*; the
adaptive rule follows BlackJAX's ``adaptive_tempered`` ESS bisection).

>>> path = DataPath(num_data=10, batch_size=4)
>>> path.num_batches, path.included(1.5)
(3, (8, tensor([1.0000, 1.0000, 1.0000, 1.0000, 0.5000, 0.5000, 0.5000, 0.5000])))
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import torch


def log_ess(log_weights: torch.Tensor) -> torch.Tensor:
    """``log ESS = 2 logsumexp(w) - logsumexp(2 w)`` for unnormalised log-weights."""
    return 2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1)


class DataPath:
    """Batches of ``num_data`` examples (already in their random order) and the level coefficients.

    :param num_data: number of training examples ``N``.
    :param batch_size: examples per batch; ``None`` or ``>= N`` gives one batch (likelihood tempering).
    """

    def __init__(self, num_data: int, batch_size=None):
        if not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"DataPath: num_data must be a positive integer, got {num_data!r}.")
        if batch_size is None or batch_size >= num_data:
            batch_size = num_data
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.num_data = num_data
        self.batch_size = batch_size
        self.num_batches = math.ceil(num_data / batch_size)

    def bounds(self, b: int) -> Tuple[int, int]:
        """``(start, stop)`` of batch ``b`` in the ordered data."""
        return b * self.batch_size, min(self.num_data, (b + 1) * self.batch_size)

    def included(self, level: float, dtype=None, device=None) -> Tuple[int, torch.Tensor]:
        """``(n, c)``: the target at ``level`` uses the first ``n`` examples with weights ``c`` (n,)."""
        full = min(int(math.floor(level)), self.num_batches)
        frac = level - full
        n_full = self.bounds(full - 1)[1] if full > 0 else 0
        if frac <= 0 or full >= self.num_batches:
            return n_full, torch.ones(n_full, dtype=dtype, device=device)
        stop = self.bounds(full)[1]
        c = torch.ones(stop, dtype=dtype, device=device)
        c[n_full:] = frac
        return stop, c


# A batch log-likelihood oracle: b -> (P,) summed log-likelihood of batch b for every particle.
BatchLogLik = Callable[[int], torch.Tensor]


class Adaptive:
    """Advance as far as keeps the ESS at ``ess_threshold * P``, with a tempered newest batch.

    Walks batch by batch from the current level, evaluating each batch's log-likelihood only when
    the ESS would still be above the threshold with it fully included; inside the batch where the
    ESS would cross, the fraction is found by bisection. With one batch this is adaptive
    likelihood tempering.

    :param ess_threshold: target ESS as a fraction of the number of particles.
    :param tol: bisection tolerance on the level.
    """

    def __init__(self, ess_threshold: float = 0.5, tol: float = 1e-4):
        if not 0 < ess_threshold < 1:
            raise ValueError(f"ess_threshold must be in (0, 1), got {ess_threshold!r}.")
        self.ess_threshold = ess_threshold
        self.tol = tol

    def __call__(self, log_weights: torch.Tensor, level: float, batch_loglik: BatchLogLik,
                 path: DataPath) -> Tuple[float, torch.Tensor, int]:
        """Returns ``(new_level, log incremental weights (P,), batches evaluated)``."""
        target = math.log(self.ess_threshold * log_weights.shape[-1])
        inc = torch.zeros_like(log_weights)
        pos, evaluated = level, 0
        while pos < path.num_batches:
            b = int(math.floor(pos))
            ll = batch_loglik(b)
            evaluated += 1
            room = b + 1 - pos
            if log_ess(log_weights + inc + room * ll) >= target:
                inc, pos = inc + room * ll, float(b + 1)
                continue
            lo, hi = 0.0, room
            while hi - lo > self.tol * room:
                mid = 0.5 * (lo + hi)
                if log_ess(log_weights + inc + mid * ll) >= target:
                    lo = mid
                else:
                    hi = mid
            # Move at least a little so a sharp likelihood can never stall the sampler.
            t = max(lo, self.tol * room)
            return pos + t, inc + t * ll, evaluated
        return float(path.num_batches), inc, evaluated


class Linear:
    """Add a fixed number of whole batches per step (no tempering of the newest batch).

    :param batches_per_step: batches added at each SMC step.
    """

    def __init__(self, batches_per_step: int = 1):
        if not isinstance(batches_per_step, int) or batches_per_step < 1:
            raise ValueError(f"batches_per_step must be a positive integer, got {batches_per_step!r}.")
        self.batches_per_step = batches_per_step

    def __call__(self, log_weights, level, batch_loglik, path):
        start = int(math.floor(level))
        new = min(path.num_batches, start + self.batches_per_step)
        inc = torch.zeros_like(log_weights)
        for b in range(start, new):
            inc = inc + (min(1.0, b + 1 - level) if b == start else 1.0) * batch_loglik(b)
        return float(new), inc, new - start
