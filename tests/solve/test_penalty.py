"""The weight penalty: resolved once from the first gradient, a constant added to every
candidate's gradient after (never the base's row), its cost linear in the candidates'
weights, and carried across a resume."""

from __future__ import annotations

import torch

from mergekit_fw.solve.penalty import WeightPenalty


def test_no_penalty_leaves_the_gradient_alone():
    penalty = WeightPenalty(0.0)
    gradient = torch.tensor([[-1.0, 2.0]], dtype=torch.float64)
    assert penalty.applied(gradient) is gradient
    assert penalty.per_unit is None and penalty.cost(torch.ones(2, 2)) == 0.0 and penalty.to_json() == {}


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


def test_a_resumed_penalty_keeps_its_resolved_cost():
    penalty = WeightPenalty(0.5)
    penalty.applied(torch.full((2, 3), -4.0, dtype=torch.float64))
    resumed = WeightPenalty(0.5)
    resumed.load(penalty.to_json())
    gradient = torch.full((2, 3), 1.0, dtype=torch.float64)
    assert torch.equal(resumed.applied(gradient)[1:], gradient[1:] + 2.0)
