"""The weight penalty: resolved once from the first gradient, a constant added to every
candidate's gradient after (never the base's row), its cost linear in the candidates'
weights, and not resolved again once it has a value."""

from __future__ import annotations

import torch

from mergekit_fw.solve.penalty import WeightPenalty


def test_no_penalty_leaves_the_gradient_alone():
    penalty = WeightPenalty(0.0)
    gradient = torch.tensor([[-1.0, 2.0]], dtype=torch.float64)
    assert penalty.applied(gradient) is gradient
    assert penalty.per_unit is None and penalty.cost(torch.ones(2, 2)) == 0.0


def test_the_penalty_is_a_fraction_of_the_first_gradients_mean_size_and_then_fixed():
    penalty = WeightPenalty(0.5)
    # the base's row (zeros, as vertex_scores makes it), then two candidates: mean |g| = 2
    first = torch.tensor([[0.0, 0.0], [-1.0, 3.0], [2.0, -2.0]], dtype=torch.float64)
    assert torch.equal(penalty.applied(first), torch.tensor([[0.0, 0.0], [0.0, 4.0], [3.0, -1.0]], dtype=torch.float64))
    later = torch.tensor([[0.0, 0.0], [10.0, -30.0], [0.0, 0.0]], dtype=torch.float64)
    # not re-resolved on a bigger gradient
    assert torch.equal(penalty.applied(later)[1:], later[1:] + 1.0) and torch.equal(penalty.applied(later)[0], later[0])
    # the base's weight is free: 0.5 + 0.25 + 1.0 of candidate weight at 1 a unit
    weights = torch.tensor([[0.75, 0.5], [0.25, 0.5], [1.0, 0.0]], dtype=torch.float64)
    assert penalty.cost(weights) == 1.75


def test_a_penalty_resolved_earlier_is_not_resolved_again():
    resumed = WeightPenalty(0.5, per_unit=2.0)  # as a resumed solve builds it from its trace
    gradient = torch.full((2, 3), -8.0, dtype=torch.float64)
    assert torch.equal(resumed.applied(gradient)[1:], gradient[1:] + 2.0) and resumed.per_unit == 2.0
