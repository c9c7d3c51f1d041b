"""Step rules of hard Frank-Wolfe, as pure functions of the loss along the direction.

``phi(gamma)`` is the calibration loss at ``W + gamma * d``; each call is one forward
pass over the calibration set, the cost that matters. ``phi(0)`` is known (the
iteration's own loss) and so is its slope ``phi'(0) = <g, d>`` (minus the LMO's
gain): the quadratic rule uses both and usually needs two passes where the
golden-section search needs eight; the adaptive rule places its first trial by the
curvature of the last step and often needs one. Every searched rule
returns the best point it saw with gamma = 0 among them, so a step never raises the
loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

_GOLDEN = (math.sqrt(5) - 1) / 2

Phi = Callable[[float], float]
Searched = tuple[float, float, list[tuple[float, float]]]  # (gamma, loss there, every (gamma, loss) seen)


def schedule(t: int) -> float:
    """The classic open-loop rule 2 / (t + 2) (t counts from 0)."""
    return 2.0 / (t + 2.0)


def fixed(gamma: float, t: int) -> float:
    """The authors' published rule gamma / (t + 2)."""
    return gamma / (t + 2.0)


class _Memo:
    """phi with every value kept, gamma = 0 included."""

    def __init__(self, phi: Phi, f0: float):
        self.phi, self.seen = phi, {0.0: f0}

    def __call__(self, x: float) -> float:
        if x not in self.seen:
            self.seen[x] = self.phi(x)
        return self.seen[x]

    def best(self) -> Searched:
        gamma = min(self.seen, key=lambda x: (self.seen[x], x))
        return gamma, self.seen[gamma], sorted(self.seen.items())


def golden_section(phi: Phi, f0: float, evaluations: int, top: float = 1.0) -> Searched:
    """Minimise ``phi`` on [0, top] with a fixed number of evaluations."""
    f = _Memo(phi, f0)
    f(top)
    a, b = 0.0, top
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    while len(f.seen) - 1 < evaluations:
        if f(c) <= f(d):
            b, d = d, c
            c = b - _GOLDEN * (b - a)
        else:
            a, c = c, d
            d = a + _GOLDEN * (b - a)
    return f.best()


def quadratic(phi: Phi, f0: float, slope: float, evaluations: int, top: float = 1.0) -> Searched:
    """One evaluation at ``top`` fits the parabola through (0, f0) with slope ``slope``;
    its minimiser (clipped to (0, top]) is evaluated next. Then, while no evaluated point
    is below f0 and evaluations remain, the step is halved (backtracking). A
    non-negative slope (no promised decrease) evaluates nothing."""
    f = _Memo(phi, f0)
    if slope >= 0 or evaluations < 1:
        return f.best()
    f_top = f(top)
    curvature = (f_top - f0 - slope * top) / (top * top)
    return _halving(f, f0, min(top, -slope / (2 * curvature)) if curvature > 0 else top, evaluations)


def _halving(f: _Memo, f0: float, gamma: float, evaluations: int) -> Searched:
    """Try ``gamma``, halving it while the loss does not fall and evaluations remain."""
    while len(f.seen) - 1 < evaluations and gamma > 0:
        if f(gamma) < f0:
            break
        gamma /= 2.0
    return f.best()


def adaptive(
    phi: Phi,
    f0: float,
    slope: float,
    sq_norm: float,
    curvature: float | None,
    evaluations: int,
    top: float = 1.0,
    *,
    tolerance: float = 0.25,
) -> tuple[Searched, float | None]:
    """The quadratic rule with its first trial placed by the curvature carried from
    the last step (after Pedregosa, Negiar, Askari and Jaggi 2020's adaptive step).

    ``curvature`` ``L`` is per unit of ``|d|^2`` (``sq_norm``), so it carries over
    between directions of different lengths: the first trial is the minimiser of
    ``f0 + gamma slope + L gamma^2 |d|^2 / 2``. The parabola through ``(0, f0)`` with
    slope ``slope`` and that trial is fitted; when the trial lowered the loss and lies
    within ``tolerance`` of the fit's minimiser (then it has at least
    ``1 - tolerance^2`` of the parabola's decrease) it is taken after one forward pass.
    Otherwise the fit's minimiser is tried next and halved while the loss does not fall,
    as the quadratic rule does. Where there is no estimate yet the first trial is
    ``top``, as in the quadratic rule (which then always tries the fit's minimiser too).
    Returns the searched result and the curvature of the last fit, to carry (None where
    the loss curved down)."""
    f = _Memo(phi, f0)
    if slope >= 0 or evaluations < 1 or sq_norm <= 0:
        return f.best(), curvature
    known = curvature is not None and math.isfinite(curvature) and curvature > 0
    trial = min(top, -slope / (curvature * sq_norm)) if known else top  # type: ignore[operator]
    value = f(trial)
    bend = (value - f0 - slope * trial) / (trial * trial)
    fitted = min(top, -slope / (2 * bend)) if bend > 0 else top
    carried = 2.0 * bend / sq_norm if bend > 0 else None
    if value < f0 and abs(fitted - trial) <= tolerance * trial:
        return f.best(), carried
    return _halving(f, f0, fitted, evaluations), carried
