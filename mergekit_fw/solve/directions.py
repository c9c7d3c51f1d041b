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

* ``boosted``: the LMO is called again on what the direction so far leaves of the
  negative gradient (Combettes and Pokutta 2020, "Boosting Frank-Wolfe by chasing
  gradients"), a matching pursuit over the set's vertices; the direction is the
  conic mix of ``S_k - W`` it finds, scaled so that ``W + d`` is their convex mix.

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

Why boosting: every other direction moves all coefficients at one rate, towards a
vertex, whatever their gradient. With a coefficient per LoRA rank component (about a
thousand a solve) the few coefficients with a large gradient and the many with a tiny
one then move alike, and the searched step is as short as the noisiest allow. The
boosted direction is close to the negative gradient itself (its alignment rises
round by round until it gains less than ``BOOST_ALIGNMENT``), yet it is still a mix
of the set's vertices: no projection, and the same oracle pass, since the extra LMO
calls are arithmetic on the score table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergekit_fw.solve.constraints import ConstraintSet, gain

DIRECTIONS = ("frank_wolfe", "away", "pairwise", "projected_pairwise", "boosted")
BOOST_ROUNDS = 100  # at most this many LMO calls a direction (the paper's K)
BOOST_ALIGNMENT = 1e-3  # a round is kept while it raises the cosine to -g by this much (the paper's delta)


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
    rank_of: Callable[[torch.Tensor], torch.Tensor],
    point: torch.Tensor,
) -> Direction:
    """The direction ``rule`` takes from ``weights`` given the LMO's ``point``. ``rank_of``
    turns scores into what the LMO minimises, so the away point is the worst by the same
    measure and boosting's further LMO calls rank as the first did."""
    towards = Direction(point - weights, 1.0, "frank_wolfe", -gain(weights, vscores, point))
    if rule == "frank_wolfe":
        return towards
    if rule not in DIRECTIONS:
        raise ValueError(f"unknown direction {rule!r} (known: {', '.join(DIRECTIONS)})")
    if rule == "boosted":
        return boosted(constraint, weights, vscores, rank_of) or towards
    rank = rank_of(vscores)
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


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    norms = float(a.norm() * b.norm())
    return float((a * b).sum()) / norms if norms > 0 else -1.0  # the empty direction aligns worst


def boosted(
    constraint: ConstraintSet,
    weights: torch.Tensor,
    vscores: torch.Tensor,
    rank_of: Callable[[torch.Tensor], torch.Tensor],
    rounds: int = BOOST_ROUNDS,
    delta: float = BOOST_ALIGNMENT,
) -> Direction | None:
    """Boosted Frank-Wolfe's direction (Combettes and Pokutta 2020, Algorithm 2), in the
    candidates' rows (row 0, the base, is ``1 - sum`` of them and follows). Round ``k``
    asks the LMO for the vertex best aligned with the residual ``r = -g - d`` and adds
    the multiple of ``S_k - W`` (or of ``-d``, to shrink an overshoot) that fits ``r``
    best, while that raises the cosine between ``d`` and ``-g`` by ``delta`` or more.
    ``lam`` tracks the total weight of the vertices in ``d``, so ``W + d / lam`` is their
    convex mix: feasible in any of the sets. None where no round was kept."""
    n_tensors = weights.shape[1]
    target, x = -vscores[1:], weights[1:]
    zero = torch.zeros_like(vscores[:1])
    d = torch.zeros_like(x)
    lam, aligned = 0.0, -1.0
    for _ in range(rounds):
        residual = target - d
        vertex = constraint.vertex(rank_of(torch.cat([zero, -residual])), n_tensors)[1:]
        u, shrink = vertex - x, False
        d_norm = float(d.norm())
        if d_norm > 0 and float((residual * -d).sum()) / d_norm > float((residual * u).sum()):
            u, shrink = -d / d_norm, True
        size = float((u * u).sum())
        if size == 0:
            break
        weight = float((residual * u).sum()) / size
        if weight <= 0:
            break
        candidate = d + weight * u
        better = _cosine(target, candidate)
        if better - aligned < delta:
            break
        lam = lam * (1 - weight / d_norm) if shrink else lam + weight
        d, aligned = candidate, better
    if lam <= 0:
        return None
    rows = d / lam
    vector = torch.cat([-rows.sum(dim=0, keepdim=True), rows])
    slope = float((vscores * vector).sum())
    top = constraint.max_step(weights, vector)
    if slope >= 0 or not top > 0:
        return None
    # W + d / lam is feasible (top >= 1 up to rounding); where the set leaves more room the search may use it
    return Direction(vector, top if math.isfinite(top) else 1.0, "boosted", slope)
