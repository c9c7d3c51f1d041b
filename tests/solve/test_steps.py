"""Step rules on functions of gamma with known minima, counting evaluations (each is a
forward pass in a real solve)."""

from __future__ import annotations

import math

import pytest

from mergekit_fw.solve.steps import golden_section, quadratic


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
