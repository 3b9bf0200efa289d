"""Step-size schedules for stochastic-gradient MCMC: ``schedule(t) -> step size`` at step ``t``.

Schedules are small picklable objects (``MCMC`` may send the kernel to worker processes).

* :class:`Constant`: ``eps_t = eps``.
* :class:`PolynomialDecay`: ``eps_t = eps (1 + t / decay_steps)^(-power)`` (Welling & Teh, 2011,
  with ``power`` in ``(0.5, 1]`` for the Robbins-Monro conditions of exact asymptotics).
* :class:`CyclicalCosine`: ``eps_t = eps / 2 (cos(pi mod(t, L) / L) + 1)``, ``L = ceil(T / M)``
  (cyclical SG-MCMC, Zhang et al., ICLR 2020; the schedule of Ke & Fan, 2022). Large steps at the
  start of a cycle explore, small steps at the end sample.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union


class Constant:
    """``eps_t = step_size``.

    >>> ps.infer.mcmc.Constant(0.1)(100)
    0.1
    """

    def __init__(self, step_size: float):
        self.step_size = float(step_size)

    def __call__(self, t: int) -> float:
        return self.step_size

    def __repr__(self):
        return f"Constant({self.step_size:g})"


class PolynomialDecay:
    """``eps_t = step_size * (1 + t / decay_steps) ** (-power)``.

    :param step_size: initial step size.
    :param decay_steps: steps over which the step size roughly halves (for ``power = 1``).
    :param power: decay exponent (``0.55`` is the usual SGLD choice).

    >>> round(ps.infer.mcmc.PolynomialDecay(1.0, decay_steps=10, power=1.0)(10), 3)
    0.5
    """

    def __init__(self, step_size: float, decay_steps: float = 1000.0, power: float = 0.55):
        if decay_steps <= 0 or power < 0:
            raise ValueError(f"PolynomialDecay: need decay_steps > 0 and power >= 0, got {decay_steps}, {power}.")
        self.step_size, self.decay_steps, self.power = float(step_size), float(decay_steps), float(power)

    def __call__(self, t: int) -> float:
        return self.step_size * (1.0 + t / self.decay_steps) ** (-self.power)

    def __repr__(self):
        return f"PolynomialDecay({self.step_size:g}, decay_steps={self.decay_steps:g}, power={self.power:g})"


class CyclicalCosine:
    """``eps_t = step_size / 2 * (cos(pi * mod(t, L) / L) + 1)`` with cycle length ``L``.

    :param step_size: step size at the start of each cycle.
    :param cycle_length: steps per cycle ``L`` (e.g. ``ceil(total_steps / num_cycles)``).

    >>> s = ps.infer.mcmc.CyclicalCosine(1.0, cycle_length=10)
    >>> s(0), round(s(5), 3), s(10)
    (1.0, 0.5, 1.0)
    """

    def __init__(self, step_size: float, cycle_length: int):
        if cycle_length < 1:
            raise ValueError(f"CyclicalCosine: cycle_length must be >= 1, got {cycle_length}.")
        self.step_size, self.cycle_length = float(step_size), int(cycle_length)

    def __call__(self, t: int) -> float:
        r = (t % self.cycle_length) / self.cycle_length
        return 0.5 * self.step_size * (math.cos(math.pi * r) + 1.0)

    def __repr__(self):
        return f"CyclicalCosine({self.step_size:g}, cycle_length={self.cycle_length})"


ScheduleSpec = Union[None, str, Callable[[int], float]]


def make_schedule(step_size: float, schedule: ScheduleSpec = None, total_steps: Optional[int] = None,
                  **options) -> Callable[[int], float]:
    """Build a schedule from a name: ``None``/``"constant"``, ``"polynomial"`` (options
    ``decay_steps``, ``power``), ``"cyclical"`` (options ``num_cycles`` (default 4) or
    ``cycle_length``; needs ``total_steps`` when only ``num_cycles`` is given); a callable
    ``t -> step size`` is returned unchanged."""
    if not (isinstance(step_size, (int, float)) and step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a positive number, got {step_size!r}.")
    if callable(schedule):
        return schedule
    if schedule is None or schedule == "constant":
        return Constant(step_size)
    if schedule == "polynomial":
        return PolynomialDecay(step_size, **options)
    if schedule == "cyclical":
        length = options.get("cycle_length")
        if length is None:
            if total_steps is None:
                raise ValueError("cyclical schedule: give cycle_length, or total_steps and num_cycles.")
            length = math.ceil(total_steps / options.get("num_cycles", 4))
        return CyclicalCosine(step_size, length)
    raise ValueError(f"Unknown step_size_schedule {schedule!r}: use 'constant', 'polynomial', 'cyclical' "
                     "or a callable t -> step size.")
