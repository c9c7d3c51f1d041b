"""The stochastic solvers' update rules as pure maths: Adam as torch computes it, the
projected step inside the set, the momentum average and steps of Mokhtari et al."""

from __future__ import annotations

import pytest
import torch

from mergekit_fw.solve.constraints import Box, Hull
from mergekit_fw.solve.lmo import ranking
from mergekit_fw.solve.updates import AdamState, MomentumFrankWolfe, ProjectedAdam, adam_update


def test_adam_update_is_torch_adam():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(4, 3, generator=g, dtype=torch.float64)
    theirs = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([theirs], lr=0.05)
    ours, state = start.clone(), AdamState.zeros_like(start)
    for _ in range(25):
        gradient = torch.randn(4, 3, generator=g, dtype=torch.float64)
        theirs.grad = gradient.clone()
        optimiser.step()
        update, state = adam_update(state, gradient, 0.05)
        ours = ours - update
    assert torch.allclose(ours, theirs.detach(), rtol=0, atol=1e-14)
    assert AdamState.from_json(state.to_json()).steps == 25


def test_projected_adam_with_shared_coefficients_moves_every_column_alike():
    rule = ProjectedAdam(lr=0.1, shared=True)
    weights = Box().start_at_init(4, 3) * 0  # coefficients 0, base row 1
    weights[0] = 1.0
    gradient = torch.tensor([[0.0] * 3, [-1.0, -2.0, 0.5], [1.0, 1.0, 1.0], [0.2, -0.1, -0.2]], dtype=torch.float64)
    moved = rule.step(Box(), weights, gradient, 0)
    Box().check(moved)
    assert bool((moved == moved[:, :1]).all())
    # Adam's first step is lr times the sign of the summed gradient (-2.5, 3, -0.1): candidates 0
    # and 2 rise, 1 would fall and is clipped at 0
    assert moved[1:, 0].tolist() == pytest.approx([0.1, 0.0, 0.1], abs=1e-6)


def test_momentum_average_and_steps_follow_the_paper():
    rank = lambda scores: ranking(scores, "layer", "inner_product")  # noqa: E731
    rule = MomentumFrankWolfe(rank)
    assert MomentumFrankWolfe.rho(0) == pytest.approx(1.0) and MomentumFrankWolfe.gamma(0) == pytest.approx(0.25)
    g = torch.Generator().manual_seed(2)
    weights = Hull().start_at_init(4, 2) * 0
    weights[0] = 1.0
    expected = None
    for t in range(6):
        gradient = torch.cat([torch.zeros(1, 2, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)])
        rho = 4.0 / (t + 8) ** (2.0 / 3.0)
        expected = gradient if expected is None else (1 - min(rho, 1.0)) * expected + min(rho, 1.0) * gradient
        point = Hull().vertex(rank(expected), 2)
        new = rule.step(Hull(), weights, gradient, t)
        Hull().check(new)
        assert torch.allclose(new, weights + 2.0 / (t + 8) * (point - weights), atol=1e-15)
        assert torch.allclose(rule.average, expected, atol=1e-15)
        weights = new
    again = MomentumFrankWolfe(rank)
    again.load(rule.to_json())
    assert torch.equal(again.average, rule.average)
