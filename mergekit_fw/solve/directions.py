"""Where hard Frank-Wolfe moves, given the LMO's point: pure functions of the
constraint set, the iterate and the scores.

* ``frank_wolfe``: towards the LMO's point S, gamma in [0, 1] (the paper).
* ``away``: when moving away from the worst active point A promises more than moving
  to S (Wolfe 1970; Lacoste-Julien and Jaggi 2015), along W - A, as far as the set
  allows; an early pick can so be taken back.
* ``pairwise``: weight moved straight from A to S, along S - A.

Away and pairwise steps converge linearly on polytopes where plain FW zig-zags
towards an optimum on a face. The FW gap stays the certificate; these only choose
the direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergekit_fw.solve.constraints import ConstraintSet, gain

DIRECTIONS = ("frank_wolfe", "away", "pairwise")


@dataclass(frozen=True)
class Direction:
    vector: torch.Tensor  # d, same shape as the weights
    top: float  # the largest feasible gamma along d
    kind: str  # which step was taken: frank_wolfe, away or pairwise
    slope: float  # <g, d>: the loss's slope at gamma = 0 (negative: it promises a decrease)


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
    if rule == "pairwise":
        vector, kind = point - worst, "pairwise"
    else:
        if -towards.slope >= gain(worst, vscores, weights):  # <-g, S - W> against <-g, W - A>
            return towards
        vector, kind = weights - worst, "away"
    top = constraint.max_step(weights, vector)
    slope = float((vscores * vector).sum())
    if not 0 < top < math.inf or slope >= 0:
        return towards  # no room to move, or nothing promised: the FW step decides
    return Direction(vector, top, kind, slope)
