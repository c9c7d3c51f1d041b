"""The step directions on random iterates of each set: the projected pairwise arc
starts as the straight pairwise ray, stays in the set all the way, and in the box
ends at the LMO's point."""

from __future__ import annotations

import pytest
import torch

from mergekit_fw.solve.constraints import Box, Hull, ScaledHull
from mergekit_fw.solve.directions import choose
from mergekit_fw.solve.lmo import ranking, vertex_scores

N, L = 4, 6  # candidates, tensors
SETS = [Hull(), Box(), ScaledHull(scale=2.5)]


def _iterate(constraint, generator: torch.Generator) -> torch.Tensor:
    w = torch.rand(1 + N, L, generator=generator, dtype=torch.float64)
    if isinstance(constraint, Box):
        w[1:, ::2] = (w[1:, ::2] > 0.5).to(torch.float64)  # some coefficients at their bounds
        return constraint.snap(w)
    return w / w.sum(0)


@pytest.mark.parametrize("constraint", SETS, ids=lambda c: c.name)
def test_the_projected_pairwise_arc_starts_as_the_ray_and_stays_in_the_set(constraint):
    g = torch.Generator().manual_seed(3)
    checked = 0
    for _ in range(30):
        w = _iterate(constraint, g)
        vscores = vertex_scores(torch.randn(N, L, generator=g, dtype=torch.float64))
        rank = ranking(vscores, "layer", "inner_product")
        best = constraint.vertex(rank, L)
        straight = choose("pairwise", constraint, w, vscores, rank, best)
        arc = choose("projected_pairwise", constraint, w, vscores, rank, best)
        if straight.kind != "pairwise":  # no room: both fall back to the FW step
            assert arc.kind == "frank_wolfe" and not arc.projected
            continue
        checked += 1
        assert arc.kind == "projected_pairwise" and arc.projected and arc.top == 1.0
        torch.testing.assert_close(arc.vector, straight.vector, rtol=0, atol=0)
        assert arc.slope == straight.slope < 0
        for gamma in torch.linspace(0, 1, 11).tolist():
            constraint.check(arc.at(constraint, w, gamma))
        for gamma in (0.0, 0.5 * straight.top, straight.top):  # where the ray is in the set, the arc is the ray
            torch.testing.assert_close(arc.at(constraint, w, gamma), straight.at(constraint, w, gamma))
        if isinstance(constraint, Box):
            torch.testing.assert_close(arc.at(constraint, w, 1.0), best, rtol=0, atol=1e-12)
    assert checked >= 10


def test_in_the_box_the_arc_goes_past_the_first_bound_where_the_ray_stops():
    """One coefficient a hair above 0 and falling caps the straight pairwise step at that
    hair; along the arc it stops at 0 and the others keep moving."""
    box = Box()
    w = box.snap(torch.tensor([[0.0, 0.0], [1e-4, 0.5], [0.5, 0.3]], dtype=torch.float64))
    vscores = vertex_scores(torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64))
    rank = ranking(vscores, "layer", "inner_product")
    best = box.vertex(rank, 2)
    straight = choose("pairwise", box, w, vscores, rank, best)
    arc = choose("projected_pairwise", box, w, vscores, rank, best)
    assert straight.top == pytest.approx(1e-4)
    half = arc.at(box, w, 0.25)
    assert half[1:].flatten().tolist() == pytest.approx([0.0, 0.75, 0.75, 0.05])
