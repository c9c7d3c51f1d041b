"""Where hard Frank-Wolfe moves, given the LMO's point: pure functions of the
constraint set, the iterate and the scores.

* ``frank_wolfe``: towards the LMO's point S, gamma in [0, 1] (the paper).
* ``away``: when moving away from the worst active point A promises more than moving
  to S (Wolfe 1970; Lacoste-Julien and Jaggi 2015), along W - A, as far as the set
  allows; an early pick can so be taken back.
* ``pairwise``: weight moved straight from A to S, along S - A.
* ``projected_pairwise``: the pairwise direction, followed along the set's
  projection of the ray, ``P(W + gamma (S - A))`` for gamma in [0, 1], instead of
  stopping where the first weight reaches its bound.

Away and pairwise steps converge linearly on polytopes where plain FW zig-zags
towards an optimum on a face. The FW gap stays the certificate; these only choose
the direction.

Why the projected one: in the box, with thousands of coefficients, the pairwise ray
leaves the set as soon as the one coefficient nearest its bound gets there, so most
steps are cut to a thousandth or less and the solve stalls (measured on the full
testbed at 12 and more asked tasks). Along the projection (Bertsekas' projection
arc) a coefficient that reaches its bound stays there while the others go on; in
the box the arc ends at the LMO's point S itself. Near gamma = 0 the arc is the ray,
so the step searches see the same slope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergekit_fw.solve.constraints import ConstraintSet, gain

DIRECTIONS = ("frank_wolfe", "away", "pairwise", "projected_pairwise")


@dataclass(frozen=True)
class Direction:
    vector: torch.Tensor  # d, same shape as the weights
    top: float  # the largest feasible gamma along d
    kind: str  # which step was taken: frank_wolfe, away, pairwise or projected_pairwise
    slope: float  # <g, d>: the loss's slope at gamma = 0 (negative: it promises a decrease)
    projected: bool = False  # the step follows the set's projection of the ray (the arc)

    def at(self, constraint: ConstraintSet, weights: torch.Tensor, gamma: float) -> torch.Tensor:
        """The point ``gamma`` along this direction from ``weights``."""
        moved = weights + gamma * self.vector
        return constraint.project(moved) if self.projected else moved


def choose(
    rule: str,
    constraint: ConstraintSet,
    weights: torch.Tensor,
    vscores: torch.Tensor,
    rank: torch.Tensor,
    point: torch.Tensor,
) -> Direction:
    """The direction ``rule`` takes from ``weights`` given the LMO's ``point`` (``rank``
    is what the LMO minimised, so the away point is the worst by the same measure)."""
    towards = Direction(point - weights, 1.0, "frank_wolfe", -gain(weights, vscores, point))
    if rule == "frank_wolfe":
        return towards
    if rule not in DIRECTIONS:
        raise ValueError(f"unknown direction {rule!r} (known: {', '.join(DIRECTIONS)})")
    worst = constraint.away(weights, rank)
    if worst is None:  # task-wise, and no vertex is active in every tensor
        return towards
    if rule in ("pairwise", "projected_pairwise"):
        vector, kind = point - worst, rule
    else:
        if -towards.slope >= gain(worst, vscores, weights):  # <-g, S - W> against <-g, W - A>
            return towards
        vector, kind = weights - worst, "away"
    top = constraint.max_step(weights, vector)
    slope = float((vscores * vector).sum())
    if not 0 < top < math.inf or slope >= 0:
        return towards  # no room to move, or nothing promised: the FW step decides
    if kind == "projected_pairwise":  # the ray is in the set up to top, so the arc starts as the ray
        return Direction(vector, 1.0, kind, slope, projected=True)
    return Direction(vector, top, kind, slope)
