"""Step rules on functions of gamma with known minima, counting evaluations (each is a
forward pass in a real solve)."""

from __future__ import annotations

import math

import pytest

from mergekit_fw.solve.steps import adaptive, golden_section, quadratic


class Counted:
    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, x: float) -> float:
        self.calls += 1
        return self.f(x)


@pytest.mark.parametrize("minimum", [0.05, 0.3, 0.77])
def test_quadratic_finds_a_parabolas_minimum_in_two_evaluations(minimum):
    phi = Counted(lambda g: 2.0 * (g - minimum) ** 2 + 1.0)
    f0, slope = phi.f(0.0), -4.0 * minimum
    gamma, value, seen = quadratic(phi, f0, slope, evaluations=8)
    assert gamma == pytest.approx(minimum, abs=1e-12) and value == pytest.approx(1.0, abs=1e-12)
    assert phi.calls == 2 and len(seen) == 3


def test_quadratic_takes_the_whole_step_when_the_loss_still_falls_at_one():
    phi = Counted(lambda g: 1.0 - g + 0.1 * g * g)  # minimum at 5, beyond the step range
    gamma, value, _ = quadratic(phi, 1.0, -1.0, evaluations=8)
    assert gamma == 1.0 and value == pytest.approx(0.1) and phi.calls == 1


def test_quadratic_backtracks_and_never_raises_the_loss():
    # a steep wall: the parabola's guess overshoots, halving finds the dip near 0
    phi = Counted(lambda g: 1.0 - 0.1 * g + 50 * max(0.0, g - 0.01) ** 2 + (1e3 if g > 0.5 else 0.0))
    gamma, value, _ = quadratic(phi, 1.0, -0.1, evaluations=8)
    assert 0 < gamma <= 0.02 and value < 1.0 and phi.calls <= 8
    rising = Counted(lambda g: 1.0 + g)  # a wrong slope: nothing below f0 exists
    gamma, value, seen = quadratic(rising, 1.0, -1.0, evaluations=5)
    assert gamma == 0.0 and value == 1.0 and rising.calls == 5
    flat = Counted(lambda g: 1.0)
    assert quadratic(flat, 1.0, 0.0, evaluations=5)[0] == 0.0 and flat.calls == 0  # no promised decrease


def test_golden_section_finds_the_minimum_of_a_smooth_function():
    gamma, value, seen = golden_section(lambda g: math.cosh(g - 0.4), f0=math.cosh(0.4), evaluations=20)
    assert gamma == pytest.approx(0.4, abs=1e-3) and len(seen) == 21


def _parabola(minimum: float, bend: float = 2.0):
    """phi(g) = bend (g - minimum)^2 + 1: f0, slope and phi, counted."""
    return Counted(lambda g: bend * (g - minimum) ** 2 + 1.0), bend * minimum**2 + 1.0, -2.0 * bend * minimum


@pytest.mark.parametrize("sq_norm", [1.0, 0.01, 250.0])
def test_adaptive_is_the_quadratic_rule_first_then_steps_exactly_in_one_evaluation(sq_norm):
    phi, f0, slope = _parabola(0.3)
    (gamma, value, _), carried = adaptive(phi, f0, slope, sq_norm, None, evaluations=8)
    assert gamma == pytest.approx(0.3, abs=1e-12) and phi.calls == 2  # gamma = 1, then the fit's minimum
    assert carried == pytest.approx(2 * 2.0 / sq_norm, rel=1e-9)  # phi'' per unit of |d|^2
    phi, f0, slope = _parabola(0.12)  # the next direction, same curvature: its minimum at once
    (gamma, value, _), again = adaptive(phi, f0, slope, sq_norm, carried, evaluations=8)
    assert gamma == pytest.approx(0.12, abs=1e-9) and value == pytest.approx(1.0, abs=1e-12) and phi.calls == 1
    assert again == pytest.approx(carried, rel=1e-6)


def test_adaptive_takes_a_near_trial_and_refits_a_far_one():
    phi, f0, slope = _parabola(0.05, bend=40.0)  # true curvature 80 per unit |d|^2
    (gamma, value, _), carried = adaptive(phi, f0, slope, 1.0, 90.0, evaluations=8)  # 12% too steep
    assert phi.calls == 1 and gamma == pytest.approx(0.05 * 80 / 90) and value < f0
    assert carried == pytest.approx(80.0, rel=1e-9)  # the fit through the trial is exact on a parabola
    for wrong in (8.0, 8000.0):  # 10x too flat (overshoots, loss up), 100x too steep (a tiny step)
        phi, f0, slope = _parabola(0.05, bend=40.0)
        (gamma, value, _), carried = adaptive(phi, f0, slope, 1.0, wrong, evaluations=8)
        assert phi.calls == 2 and gamma == pytest.approx(0.05, abs=1e-9) and value == pytest.approx(1.0)
        assert carried == pytest.approx(80.0, rel=1e-9)


def test_adaptive_never_raises_the_loss_and_spends_at_most_its_budget():
    rising = Counted(lambda g: 1.0 + g)  # a wrong slope: nothing below f0 exists
    (gamma, value, _), _ = adaptive(rising, 1.0, -1.0, 1.0, 3.0, evaluations=5)
    assert gamma == 0.0 and value == 1.0 and rising.calls == 5
    flat = Counted(lambda g: 1.0)
    (gamma, _, _), carried = adaptive(flat, 1.0, 0.0, 1.0, 3.0, evaluations=5)
    assert gamma == 0.0 and flat.calls == 0 and carried == 3.0  # no promised decrease: nothing spent
    falling = Counted(lambda g: 1.0 - g - g * g)  # curves down to the end of the set: take it all
    (gamma, value, _), carried = adaptive(falling, 1.0, -1.0, 1.0, None, evaluations=5, top=0.5)
    assert gamma == 0.5 and falling.calls == 1 and carried is None
