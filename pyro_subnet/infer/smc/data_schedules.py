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

>>> from pyro_subnet.infer.smc import DataPath
>>> path = DataPath(num_data=10, batch_size=4)
>>> path.num_batches, path.included(1.5)
(3, (8, tensor([1.0000, 1.0000, 1.0000, 1.0000, 0.5000, 0.5000, 0.5000, 0.5000])))
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Tuple

import torch


def log_ess(log_weights: torch.Tensor) -> torch.Tensor:
    """``log ESS = 2 logsumexp(w) - logsumexp(2 w)`` for unnormalised log-weights."""
    return 2 * torch.logsumexp(log_weights, -1) - torch.logsumexp(2 * log_weights, -1)


class DataPath:
    """Batches of ``num_data`` examples (already in their random order) and the level coefficients.

    Batches enter in *stages*; the batches of a stage enter together, with one common tempered
    fraction. With ``growth=1`` every stage is one batch (the newest batch is tempered). With
    ``growth=g > 1`` each stage holds ``ceil((g - 1) * k)`` batches where ``k`` batches are already
    in, e.g. 1, 1, 2, 4, 8, ... batches for ``g = 2`` (the data double from stage to stage); a
    remainder smaller than the next stage joins the last one.
    Spreading the new likelihood over many examples at a small fraction is what makes
    tempering cheap in ESS: the incremental log-weight :math:`\\phi \\sum_{j \\in \\text{stage}} \\ell_j`
    averages the particles' disagreement on individual examples, where adding the same amount of
    data as whole examples would not (see :class:`Adaptive`). A level ``s`` inside stage
    ``[b_0, b_1)`` has every batch of the stage at fraction ``(s - b_0) / (b_1 - b_0)``; integer levels
    at stage boundaries are whole batches as before, and the last level is ``num_batches``.

    :param num_data: number of training examples ``N``.
    :param batch_size: examples per batch; ``None`` or ``>= N`` gives one batch (likelihood tempering).
    :param growth: stage growth factor ``>= 1`` (1: one batch per stage).
    """

    def __init__(self, num_data: int, batch_size=None, growth: float = 1.0):
        if not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"DataPath: num_data must be a positive integer, got {num_data!r}.")
        if batch_size is None or batch_size >= num_data:
            batch_size = num_data
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not (isinstance(growth, (int, float)) and math.isfinite(growth) and growth >= 1):
            raise ValueError(f"DataPath: growth must be a number >= 1 (1: one batch per stage), got {growth!r}.")
        self.num_data = num_data
        self.batch_size = batch_size
        self.num_batches = math.ceil(num_data / batch_size)
        self.growth = float(growth)
        starts, k = [0], 0
        while k < self.num_batches:
            k = min(self.num_batches, k + self._stage_size(k))
            # A remainder smaller than the next stage joins this one: a small last stage costs
            # nearly as many steps as a large one, each at the full data's cost.
            if self.num_batches - k < self._stage_size(k):
                k = self.num_batches
            starts.append(k)
        self._stage_starts = starts   # stage i covers batches [starts[i], starts[i + 1])

    def _stage_size(self, k: int) -> int:
        """Batches in the stage that starts after ``k`` batches."""
        return max(1, math.ceil((self.growth - 1) * k - 1e-9))

    def bounds(self, b: int) -> Tuple[int, int]:
        """``(start, stop)`` of batch ``b`` in the ordered data."""
        return b * self.batch_size, min(self.num_data, (b + 1) * self.batch_size)

    def stage(self, level: float) -> Tuple[int, int]:
        """``(first, stop)`` batches of the stage that ``level`` is in (``level < num_batches``):
        ``first <= level < stop``."""
        i = bisect.bisect_right(self._stage_starts, level) - 1
        return self._stage_starts[i], self._stage_starts[i + 1]

    def included(self, level: float, dtype=None, device=None) -> Tuple[int, torch.Tensor]:
        """``(n, c)``: the target at ``level`` uses the first ``n`` examples with weights ``c`` (n,)."""
        if level >= self.num_batches:
            return self.num_data, torch.ones(self.num_data, dtype=dtype, device=device)
        first, stop = self.stage(level)
        frac = (level - first) / (stop - first)
        n_full = self.bounds(first - 1)[1] if first > 0 else 0
        if frac <= 0:
            return n_full, torch.ones(n_full, dtype=dtype, device=device)
        n = self.bounds(stop - 1)[1]
        c = torch.ones(n, dtype=dtype, device=device)
        c[n_full:] = frac
        return n, c


# A batch log-likelihood oracle: b -> (P,) summed log-likelihood of batch b for every particle.
BatchLogLik = Callable[[int], torch.Tensor]


class Adaptive:
    """Advance as far as keeps the ESS at ``ess_threshold * P``, with a tempered newest stage.

    Walks stage by stage (one batch each for a ``growth=1`` :class:`DataPath`) from the current
    level, evaluating a stage's log-likelihood only when the ESS would still be above the
    threshold with the previous stage fully included; inside the stage where the ESS would cross,
    the fraction is found by bisection. With one batch this is adaptive likelihood tempering.

    Why stages that grow: under the current particles the log-likelihood of new examples
    :math:`\\ell_j` varies from particle to particle partly in a way shared by all examples and
    partly example by example (the particles disagree on data they have not seen). Adding ``m``
    whole examples costs the ESS that per-example variance ``m`` times; tempering a stage of
    ``M`` examples by :math:`\\phi` brings in the same amount of data, :math:`\\phi M = m`, for
    :math:`\\phi^2 M = m^2 / M` times it. With stages as large as the data already in, the number
    of steps per doubling of the data stays about constant, while each step costs only the data
    included so far. The last stage (from half the data to all of it) still costs as many
    full-data steps as the last doubling of tempering or more (a stage of ``M`` new examples
    carries twice the per-example variance of tempering all ``2M``), and the stages together
    about twice that: the saving over full-batch tempering in example-gradients is bounded by
    the cost of that last stage, not by the ratio of the data to a batch (the measured steps
    and savings are in ``docs/measured.md``).

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
            first, stop = path.stage(pos)
            ll = batch_loglik(first)
            for b in range(first + 1, stop):
                ll = ll + batch_loglik(b)
            evaluated += stop - first
            # Fractions of the stage: it is at f0, and can go up to 1.
            width = stop - first
            f0 = (pos - first) / width
            room = 1.0 - f0
            if log_ess(log_weights + inc + room * ll) >= target:
                inc, pos = inc + room * ll, float(stop)
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
            return min(pos + t * width, float(stop)), inc + t * ll, evaluated
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
        if path.growth != 1:
            raise ValueError(f"Linear adds whole batches: use a DataPath with growth=1, got growth={path.growth}.")
        start = int(math.floor(level))
        new = min(path.num_batches, start + self.batches_per_step)
        inc = torch.zeros_like(log_weights)
        for b in range(start, new):
            inc = inc + (min(1.0, b + 1 - level) if b == start else 1.0) * batch_loglik(b)
        return float(new), inc, new - start
