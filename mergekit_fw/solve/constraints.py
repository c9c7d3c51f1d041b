"""The sets Frank-Wolfe may move in, one small type each (as FrankWolfe.jl has one LMO
type per set): its extreme point for a ranking, its k best points for soft FW, the
worst active point and the longest feasible step for away and pairwise steps, its
feasibility check and the snap that takes rounding drift back into it.

Each set also has its exact Euclidean projection (of the candidates' rows; the base row
follows), which the projected-gradient solver steps through.

The state is the table's vertex weights ``W`` (1 + n, L): row 0 the base, then one
row per candidate, one column per tensor; candidate ``i`` contributes
``scale * W[1 + i, l]`` times its task vector to tensor ``l``. Every set keeps the
columns summing to 1, so row 0 is always ``1 - sum`` of the others: in the hulls it
is the base's convex weight, in the box (where the sum may pass 1) it is bookkeeping
and may be negative. The solver only ever moves along ``point - W`` and mixes points
with convex weights, so it stays feasible in every set without knowing which it has.

Rankings follow :func:`mergekit_fw.solve.lmo.ranking`: (1 + n, L) for the
layer-wise LMO (one choice per tensor), (1 + n,) for the task-wise LMO (one choice
shared by every tensor). Row 0 (the base) ranks 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergekit_fw.solve.lmo import one_hot, ranked_points
from mergekit_fw.solve.simplex import InfeasibleError, check_feasible, project_to_simplex

CONSTRAINTS = ("hull", "box", "scaled_hull", "capped_box")
_ACTIVE = 1e-12  # a weight above this keeps its vertex in the active set (away steps)
_SLACK = 1e-12  # how far a capped box's longest step may take a total past the cap (rounding)


def _columns(rank: torch.Tensor, n_tensors: int) -> torch.Tensor:
    """A task-wise ranking repeated for every tensor (a layer-wise one as it is)."""
    return rank.unsqueeze(1).expand(-1, n_tensors) if rank.dim() == 1 else rank


def _check_radius(name: str, radius: float) -> None:
    if not radius > 0:
        raise ValueError(f"{name} needs a radius > 0, got {radius}")


def _check_init_fits(name: str, radius: float) -> None:
    """The initial merge is one candidate at coefficient 1: outside a set whose radius is below 1."""
    if radius < 1.0:
        raise ValueError(
            f"a run that starts from another merge needs radius >= 1 under {name} (got {radius:g}): "
            "with a smaller radius the initial merge itself lies outside the set"
        )


@dataclass(frozen=True)
class Hull:
    """The paper's set: the convex hull of the base and the candidates, per tensor.
    A point is one vertex per tensor; the candidates' total weight is at most 1."""

    scale: float = 1.0
    name: str = "hull"

    def vertex(self, rank: torch.Tensor, n_tensors: int) -> torch.Tensor:
        return self.ranked(rank, n_tensors, 1)[0]

    def ranked(self, rank: torch.Tensor, n_tensors: int, k: int) -> list[torch.Tensor]:
        """The k best vertices per tensor (ties to the lower row, so a column of zeros keeps the base)."""
        return [one_hot(choice, rank.shape[0]) for choice in ranked_points(rank, n_tensors, k)]

    def away(self, weights: torch.Tensor, rank: torch.Tensor) -> torch.Tensor | None:
        """The active vertex (weight > 0) that ranks worst, per tensor; task-wise, the worst
        row active in every tensor (None when no row is), so the point is a vertex of the
        task-wise set."""
        active = weights > _ACTIVE
        if rank.dim() == 1:
            shared = active.all(dim=1)
            if not bool(shared.any()):
                return None
            row = int(torch.where(shared, rank, torch.full_like(rank, -torch.inf)).argmax())
            return one_hot(torch.full((weights.shape[1],), row, dtype=torch.long), weights.shape[0])
        masked = torch.where(active, rank, torch.full_like(rank, -torch.inf))
        return one_hot(masked.argmax(dim=0), weights.shape[0])

    def max_step(self, weights: torch.Tensor, direction: torch.Tensor) -> float:
        """The largest gamma with weights + gamma * direction in the set (the columns' sums
        do not move along a difference of points): no weight may go below 0."""
        falling = direction < 0
        if not bool(falling.any()):
            return math.inf
        return float((weights[falling] / -direction[falling]).min().clamp(min=0.0))

    def check(self, weights: torch.Tensor, atol: float = 1e-9) -> None:
        check_feasible(weights, atol)

    def snap(self, weights: torch.Tensor) -> torch.Tensor:
        weights = weights.clamp(min=0.0)
        return weights / weights.sum(dim=0, keepdim=True)

    def project(self, weights: torch.Tensor) -> torch.Tensor:
        """The nearest point (Euclidean, over the candidates' rows) with every weight >= 0
        and the candidates' total at most 1 per column: the clamp where it already fits,
        else the sort-based projection onto the face where the total is exactly 1 (where
        the total constraint binds, KKT puts the solution on that face)."""
        c = weights[1:]
        clamped = c.clamp(min=0.0)
        over = clamped.sum(dim=0) > 1.0
        if bool(over.any()):
            clamped = torch.where(over, project_to_simplex(c, dim=0), clamped)
        return torch.cat([1.0 - clamped.sum(dim=0, keepdim=True), clamped], dim=0)

    def start_at_init(self, n_vertices: int, n_tensors: int) -> torch.Tensor:
        """All of the initial merge (the last row) at coefficient scale x weight = 1: exactly 1,
        and so the merge bit for bit, in the hull and for a radius that is a power of two; to
        the last bit of rounding otherwise."""
        weights = torch.zeros(n_vertices, n_tensors, dtype=torch.float64)
        weights[-1] = 1.0 / self.scale
        weights[0] = 1.0 - weights[-1]
        return weights


@dataclass(frozen=True)
class ScaledHull(Hull):
    """The hull of the base and base + R * delta_i: the candidates' total coefficient on
    a tensor reaches R instead of 1, so k asked tasks can each keep about R / k. The
    vertex weights are those of the hull; only what a unit of weight means changes."""

    name: str = "scaled_hull"

    def __post_init__(self) -> None:
        _check_radius(self.name, self.scale)

    def start_at_init(self, n_vertices: int, n_tensors: int) -> torch.Tensor:
        _check_init_fits(self.name, self.scale)
        return super().start_at_init(n_vertices, n_tensors)


@dataclass(frozen=True)
class Box:
    """Every candidate's coefficient in [0, 1] on its own: any subset of the pool at up
    to full strength, as PEFT users stack adapters. A point puts a candidate at 1 where
    its ranking is negative (it lowers the loss to first order), at 0 elsewhere."""

    scale: float = 1.0
    name: str = "box"

    def vertex(self, rank: torch.Tensor, n_tensors: int) -> torch.Tensor:
        return self._point((_columns(rank, n_tensors)[1:] < 0).to(torch.float64))

    def ranked(self, rank: torch.Tensor, n_tensors: int, k: int) -> list[torch.Tensor]:
        """The best point, then the points that flip the j-th least certain choice of each
        tensor (smallest |rank|), j = 1 .. k - 1. For k <= 3 these are exactly the k best
        points per tensor; beyond, the best point's nearest neighbours."""
        ranks = _columns(rank, n_tensors)[1:]
        best = (ranks < 0).to(torch.float64)
        points = [self._point(best)]
        order = torch.sort(ranks.abs(), dim=0, stable=True).indices
        for j in range(min(k - 1, ranks.shape[0])):
            flipped = best.clone()
            rows, columns = order[j], torch.arange(ranks.shape[1])
            flipped[rows, columns] = 1.0 - flipped[rows, columns]
            points.append(self._point(flipped))
        return points

    def away(self, weights: torch.Tensor, rank: torch.Tensor) -> torch.Tensor | None:
        """Per coefficient, the active end of [0, 1] that ranks worst: 1 (rank r) is active
        when c > 0, 0 (rank 0) when c < 1. Task-wise, a candidate's ends must be active in
        every tensor."""
        c = weights[1:]
        ranks = _columns(rank, weights.shape[1])[1:]
        at_one, at_zero = c > _ACTIVE, c < 1 - _ACTIVE
        if rank.dim() == 1:
            at_one = at_one.all(dim=1, keepdim=True).expand_as(c)
            at_zero = at_zero.all(dim=1, keepdim=True).expand_as(c)
        if not bool((at_one | at_zero).all()):
            return None
        # one active end: that one; both: the one with the larger rank (1 when r > 0)
        ends = torch.where(at_one & at_zero, ranks > 0, at_one)
        return self._point(ends.to(torch.float64))

    def max_step(self, weights: torch.Tensor, direction: torch.Tensor) -> float:
        """The largest gamma keeping every coefficient in [0, 1]."""
        c, d = weights[1:], direction[1:]
        limits = [c[d < 0] / -d[d < 0], (1 - c[d > 0]) / d[d > 0]]
        values = torch.cat([x.flatten() for x in limits])
        return math.inf if values.numel() == 0 else float(values.min().clamp(min=0.0))

    @staticmethod
    def _point(coefficients: torch.Tensor) -> torch.Tensor:
        return torch.cat([1.0 - coefficients.sum(dim=0, keepdim=True), coefficients], dim=0)

    def check(self, weights: torch.Tensor, atol: float = 1e-9) -> None:
        if weights.numel() == 0:
            return
        inside = weights[1:]
        if inside.numel() and (float(inside.min()) < -atol or float(inside.max()) > 1 + atol):
            raise InfeasibleError(f"box coefficient outside [0, 1]: {float(inside.min())} .. {float(inside.max())}")
        worst = float((weights.sum(dim=0) - 1).abs().max())
        if worst > atol:
            raise InfeasibleError(f"base row is not 1 - sum of the others (off by {worst})")

    def snap(self, weights: torch.Tensor) -> torch.Tensor:
        return self._point(weights[1:].clamp(0.0, 1.0))

    def project(self, weights: torch.Tensor) -> torch.Tensor:
        """The nearest point: each coefficient clipped to [0, 1] (the box is a product of intervals)."""
        return self.snap(weights)

    def start_at_init(self, n_vertices: int, n_tensors: int) -> torch.Tensor:
        coefficients = torch.zeros(n_vertices - 1, n_tensors, dtype=torch.float64)
        coefficients[-1] = 1.0
        return self._point(coefficients)


def _fill(order: torch.Tensor, eligible: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Per column, the eligible entries in ascending ``order`` at 1 until ``budget`` (per
    column) is spent, the next at what is left, the rest at 0: the greedy solution of
    min <order, x> over 0 <= x <= 1, sum x <= budget on the eligible entries, when every
    eligible entry's order is negative (or when the budget must be spent exactly)."""
    keys = torch.where(eligible, order, torch.full_like(order, math.inf))
    sorted_keys, rows = torch.sort(keys, dim=0, stable=True)
    before = torch.arange(order.shape[0], dtype=torch.float64).unsqueeze(1)
    amount = (budget.unsqueeze(0) - before).clamp(0.0, 1.0)
    amount = torch.where(torch.isfinite(sorted_keys), amount, torch.zeros_like(amount))
    return torch.zeros_like(order, dtype=torch.float64).scatter(0, rows, amount)


@dataclass(frozen=True)
class CappedBox(Box):
    """The box with the candidates' total coefficient on a tensor at most ``cap``: any
    subset of at most ``cap`` candidates at full strength. Its point is the ``cap``
    candidates that lower the loss fastest to first order, not every one whose score is
    negative: in the box a pool of many irrelevant members puts about half of them (those
    whose score the rows' noise makes negative) into every point, and each FW step gives
    them its step size (measured on the full testbed, experiment 2: at 20 members 70% of
    the box point's entries were irrelevant LoRA components). With ``cap`` at least the
    number of candidates it is the box; at 1, the hull."""

    cap: float = 1.0
    name: str = "capped_box"

    def __post_init__(self) -> None:
        _check_radius(self.name, self.cap)

    def start_at_init(self, n_vertices: int, n_tensors: int) -> torch.Tensor:
        _check_init_fits(self.name, self.cap)
        return super().start_at_init(n_vertices, n_tensors)

    def _budget(self, n_tensors: int) -> torch.Tensor:
        return torch.full((n_tensors,), float(self.cap), dtype=torch.float64)

    def vertex(self, rank: torch.Tensor, n_tensors: int) -> torch.Tensor:
        ranks = _columns(rank, n_tensors)[1:].to(torch.float64)
        return self._point(_fill(ranks, ranks < 0, self._budget(n_tensors)))

    def ranked(self, rank: torch.Tensor, n_tensors: int, k: int) -> list[torch.Tensor]:
        """The best point, then its neighbours: the j-th least certain choice of each tensor
        (smallest |rank|) flipped; a candidate switched on where the cap is spent takes the
        place of the weakest one at full weight. They stay points of the set."""
        ranks = _columns(rank, n_tensors)[1:].to(torch.float64)
        best = _fill(ranks, ranks < 0, self._budget(n_tensors))
        points = [self._point(best)]
        order = torch.sort(ranks.abs(), dim=0, stable=True).indices
        columns = torch.arange(ranks.shape[1])
        for j in range(min(k - 1, ranks.shape[0])):
            rows = order[j]
            flipped = best.clone()
            switched_on = flipped[rows, columns] < 0.5
            flipped[rows, columns] = torch.where(switched_on, 1.0, 0.0).to(torch.float64)
            over = flipped.sum(dim=0) > self.cap + _ACTIVE
            if bool(over.any()):  # drop the weakest chosen entry (largest rank) other than the new one
                held = (flipped > 0) & ~(torch.arange(ranks.shape[0]).unsqueeze(1) == rows.unsqueeze(0))
                weakest = torch.where(held, ranks, torch.full_like(ranks, -math.inf)).argmax(dim=0)
                flipped[weakest[over], columns[over]] = 0.0
            points.append(self._point(self._capped(flipped)))
        return points

    def away(self, weights: torch.Tensor, rank: torch.Tensor) -> torch.Tensor | None:
        """The worst point (largest rank) of the smallest face that holds the iterate:
        coefficients at 1 stay 1, at 0 stay 0, and where the cap binds the free ones must
        spend what is left of it exactly; where it does not, only free coefficients that
        rank positive are put at 1. Task-wise, None unless that point is the same in
        every tensor (it must be a point of the task-wise set)."""
        c = weights[1:]
        ranks = _columns(rank, weights.shape[1])[1:].to(torch.float64)
        ones, free = c >= 1 - _ACTIVE, (c > _ACTIVE) & (c < 1 - _ACTIVE)
        left = self.cap - ones.to(torch.float64).sum(dim=0)
        binding = c.sum(dim=0) >= self.cap - 1e-9
        eligible = free & (binding.unsqueeze(0) | (ranks > 0))
        point = ones.to(torch.float64) + _fill(-ranks, eligible, left.clamp(min=0.0))
        if rank.dim() == 1 and not bool((point == point[:, :1]).all()):
            return None
        return self._point(point)

    def max_step(self, weights: torch.Tensor, direction: torch.Tensor) -> float:
        """The box's largest step, and the one at which the total reaches the cap."""
        top = super().max_step(weights, direction)
        rising = direction[1:].sum(dim=0)
        # a column at its cap whose total rises by rounding only (an away or pairwise step
        # between points that both spend the cap) must not stop the others: it may pass the
        # cap by _SLACK, which the snap after the step takes back
        room = (self.cap - weights[1:].sum(dim=0)).clamp(min=0.0) + _SLACK
        up = rising > 0
        if bool(up.any()):
            top = min(top, float((room[up] / rising[up]).min()))
        return top

    def check(self, weights: torch.Tensor, atol: float = 1e-9) -> None:
        super().check(weights, atol)
        if weights.shape[0] < 2 or weights.shape[1] == 0:
            return
        total = float(weights[1:].sum(dim=0).max())
        if total > self.cap + atol:
            raise InfeasibleError(f"capped box: the candidates' total {total} passes the cap {self.cap}")

    def _capped(self, coefficients: torch.Tensor) -> torch.Tensor:
        """The exact Euclidean projection of each column onto 0 <= c <= 1, sum c <= cap:
        the clip where it fits, else clip(c - tau) with the tau at which the total is the
        cap (found by bisection to the last bit: the total is monotone in tau)."""
        clipped = coefficients.clamp(0.0, 1.0)
        over = clipped.sum(dim=0) > self.cap
        if not bool(over.any()):
            return clipped
        c = coefficients[:, over]
        low = torch.zeros(c.shape[1], dtype=torch.float64)
        high = c.max(dim=0).values.clamp(min=0.0)
        for _ in range(200):
            middle = (low + high) / 2
            if bool(((middle == low) | (middle == high)).all()):
                break
            total = (c - middle).clamp(0.0, 1.0).sum(dim=0)
            low, high = torch.where(total > self.cap, middle, low), torch.where(total > self.cap, high, middle)
        clipped[:, over] = (c - high).clamp(0.0, 1.0)
        return clipped

    def snap(self, weights: torch.Tensor) -> torch.Tensor:
        """Also the projection (the box's ``project`` is its snap): the exact one, ``_capped``."""
        return self._point(self._capped(weights[1:]))


@dataclass(frozen=True)
class Face:
    """A set with some candidates held at 0: the face of ``inner`` where they are absent.
    Every set here treats its candidates alike and gives a subset of them the same kind
    of set (a hull of fewer vertices, a box of fewer coordinates, a cap over fewer
    entries), so each method is ``inner``'s on the kept rows, the others at 0. The
    screen (:mod:`mergekit_fw.solve.screen`) builds one so that the solver and the
    update rules move only among the members it kept, without a branch of their own.

    ``keep``: per vertex row (row 0, the base, always kept)."""

    inner: Hull | Box
    keep: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not self.keep or not self.keep[0]:
            raise ValueError("a face keeps the base's row (row 0)")

    @property
    def scale(self) -> float:
        return self.inner.scale

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def rows(self) -> torch.Tensor:
        return torch.tensor(self.keep, dtype=torch.bool)

    def _embed(self, kept: torch.Tensor) -> torch.Tensor:
        full = torch.zeros((len(self.keep), *kept.shape[1:]), dtype=kept.dtype)
        full[self.rows] = kept
        return full

    def vertex(self, rank: torch.Tensor, n_tensors: int) -> torch.Tensor:
        return self._embed(self.inner.vertex(rank[self.rows], n_tensors))

    def ranked(self, rank: torch.Tensor, n_tensors: int, k: int) -> list[torch.Tensor]:
        return [self._embed(p) for p in self.inner.ranked(rank[self.rows], n_tensors, k)]

    def away(self, weights: torch.Tensor, rank: torch.Tensor) -> torch.Tensor | None:
        worst = self.inner.away(weights[self.rows], rank[self.rows])
        return None if worst is None else self._embed(worst)

    def max_step(self, weights: torch.Tensor, direction: torch.Tensor) -> float:
        """The inner set's step; a direction that moves a row held at 0 leaves the face."""
        if bool(direction[~self.rows].abs().gt(0).any()):
            return 0.0
        return self.inner.max_step(weights[self.rows], direction[self.rows])

    def check(self, weights: torch.Tensor, atol: float = 1e-9) -> None:
        held = weights[~self.rows]
        if held.numel() and float(held.abs().max()) > atol:
            raise InfeasibleError(f"a candidate the face holds at 0 has weight {float(held.abs().max())}")
        self.inner.check(weights[self.rows], atol)

    def snap(self, weights: torch.Tensor) -> torch.Tensor:
        return self._embed(self.inner.snap(weights[self.rows]))

    def project(self, weights: torch.Tensor) -> torch.Tensor:
        """The nearest point of the face: the held rows at 0 and the kept ones projected
        onto the inner set (the distance splits into the two parts)."""
        return self._embed(self.inner.project(weights[self.rows]))


ConstraintSet = Hull | Box | Face


def constraint_set(kind: str = "hull", radius: float | None = None) -> Hull | Box:
    """The set named by the ``constraint`` parameter (``radius`` for scaled_hull, the cap for capped_box)."""
    if kind == "hull":
        return Hull()
    if kind == "box":
        return Box()
    if kind == "scaled_hull":
        if radius is None:
            raise ValueError("scaled_hull needs a radius")
        return ScaledHull(scale=float(radius))
    if kind == "capped_box":
        if radius is None:
            raise ValueError("capped_box needs a cap (the radius parameter)")
        return CappedBox(cap=float(radius))
    raise ValueError(f"unknown constraint {kind!r} (known: {', '.join(CONSTRAINTS)})")


def fw_gap(constraint: ConstraintSet, weights: torch.Tensor, vscores: torch.Tensor) -> float:
    """max over the set of <-g, W - S>: >= 0, and 0 exactly at a stationary point. Over the
    layer-wise set by the inner product whatever the LMO ranks by, because only that
    certifies optimality (and the task-wise set lies inside it)."""
    point = constraint.vertex(vscores, vscores.shape[1])
    return float(((weights - point) * vscores).sum())


def gain(weights: torch.Tensor, vscores: torch.Tensor, point: torch.Tensor) -> float:
    """<-g, S - W>: the first-order decrease that moving to ``point`` promises."""
    return float(((weights - point) * vscores).sum())


def describe(point: torch.Tensor, names: list[str]) -> tuple[dict[str, int], list[str]]:
    """For the trace: per vertex, the tensors where the point puts it at full weight; per
    tensor, the candidates it takes ('+'-joined; the base when it takes none)."""
    full = point[1:] > 0.5
    chosen = {names[1 + i]: int(n) for i, n in enumerate(full.sum(dim=1).tolist()) if n}
    none = int((~full.any(dim=0)).sum())
    if none:
        chosen = {names[0]: none, **chosen}
    choice = [
        "+".join(names[1 + i] for i in full[:, l].nonzero().flatten().tolist()) or names[0]
        for l in range(point.shape[1])
    ]
    return chosen, choice
