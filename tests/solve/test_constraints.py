"""The constraint sets against brute force: every point of a small set enumerated,
the LMO's point must be the best of them, the gap the largest promised decrease,
and the formulas of ALGORITHM.md must hold."""

from __future__ import annotations

import itertools

import pytest
import torch

from mergekit_fw.solve.constraints import Box, CappedBox, Face, Hull, ScaledHull, constraint_set, describe, fw_gap
from mergekit_fw.solve.lmo import ranking, vertex_scores
from mergekit_fw.solve.simplex import InfeasibleError

N, L = 3, 4  # candidates, tensors


def column_points(constraint) -> list[torch.Tensor]:
    """Every extreme point of one tensor's set, as a (1 + N,) weight column."""
    if isinstance(constraint, Face):  # the inner set's points that leave the held rows at 0
        held = ~constraint.rows
        return [p for p in column_points(constraint.inner) if not bool(p[held].any())]
    if isinstance(constraint, CappedBox):  # at most one entry at the cap's fraction, the rest 0 or 1
        part = constraint.cap - int(constraint.cap)
        levels = [0.0, 1.0] + ([part] if part else [])
        subsets = [
            torch.tensor(bits, dtype=torch.float64)
            for bits in itertools.product(levels, repeat=N)
            if sum(bits) <= constraint.cap + 1e-12 and sum(0 < b < 1 for b in bits) <= 1
        ]
        return [torch.cat([1 - c.sum().unsqueeze(0), c]) for c in subsets]
    if isinstance(constraint, Box):
        subsets = [torch.tensor(bits, dtype=torch.float64) for bits in itertools.product([0.0, 1.0], repeat=N)]
        return [torch.cat([1 - c.sum().unsqueeze(0), c]) for c in subsets]
    return [torch.eye(1 + N, dtype=torch.float64)[v] for v in range(1 + N)]


def random_feasible(constraint, generator) -> torch.Tensor:
    if isinstance(constraint, Face):  # an inner point with the held rows moved to the base
        w = random_feasible(constraint.inner, generator)
        held = ~constraint.rows
        w[0] += w[held].sum(dim=0)
        w[held] = 0.0
        return w
    if isinstance(constraint, CappedBox):  # some columns inside, some on the face where the cap binds
        c = torch.rand(N, L, generator=generator, dtype=torch.float64) * 1.6
        return constraint.project(torch.cat([1 - c.sum(0, keepdim=True), c]))
    if isinstance(constraint, Box):
        c = torch.rand(N, L, generator=generator, dtype=torch.float64)
        return torch.cat([1 - c.sum(0, keepdim=True), c])
    w = torch.rand(1 + N, L, generator=generator, dtype=torch.float64)
    return w / w.sum(0)


KEEP = (True, True, False, True)  # a face: candidate 1 (row 2) held at 0
SETS = [Hull(), Box(), ScaledHull(scale=2.5), CappedBox(cap=2.0), CappedBox(cap=1.5),
        Face(Hull(), KEEP), Face(Box(), KEEP), Face(CappedBox(cap=1.5), KEEP)]


def set_id(constraint) -> str:
    if isinstance(constraint, Face):
        return "face-" + set_id(constraint.inner)
    return f"{constraint.name}{getattr(constraint, 'cap', '')}"


@pytest.mark.parametrize("constraint", SETS, ids=set_id)
def test_layerwise_vertex_and_gap_match_brute_force(constraint):
    g = torch.Generator().manual_seed(0)
    points = column_points(constraint)
    for _ in range(30):
        vs = vertex_scores(torch.randn(N, L, generator=g, dtype=torch.float64))
        w = random_feasible(constraint, g)
        constraint.check(w)
        best = constraint.vertex(ranking(vs, "layer", "inner_product"), L)
        constraint.check(best)
        for l in range(L):
            values = [float(p @ vs[:, l]) for p in points]
            assert float(best[:, l] @ vs[:, l]) == pytest.approx(min(values), abs=1e-12)
        brute_gap = sum(max(float((w[:, l] - p) @ vs[:, l]) for p in points) for l in range(L))
        assert fw_gap(constraint, w, vs) == pytest.approx(brute_gap, abs=1e-12)
        assert fw_gap(constraint, w, vs) >= 0 and abs(fw_gap(constraint, best, vs)) < 1e-12


@pytest.mark.parametrize("constraint", SETS, ids=set_id)
def test_taskwise_vertex_is_the_best_point_shared_by_every_tensor(constraint):
    g = torch.Generator().manual_seed(1)
    points = column_points(constraint)
    for _ in range(30):
        vs = vertex_scores(torch.randn(N, L, generator=g, dtype=torch.float64))
        best = constraint.vertex(ranking(vs, "task", "inner_product"), L)
        assert all(torch.equal(best[:, l], best[:, 0]) for l in range(L))
        values = [float((p.unsqueeze(1) * vs).sum()) for p in points]
        assert float((best * vs).sum()) == pytest.approx(min(values), abs=1e-12)


def test_the_gap_formulas_of_the_algorithm_page():
    """In coefficient form with s = d loss / d c: box sum s c - sum min(s, 0); scaled hull
    sum s c - R min(0, min s). The solver hands the sets d loss / d weight = scale * s."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(N, L, generator=g, dtype=torch.float64)
    box = Box()
    w = random_feasible(box, g)
    expected = float((s * w[1:]).sum() - s.clamp(max=0).sum())
    assert fw_gap(box, w, vertex_scores(s)) == pytest.approx(expected, abs=1e-12)
    radius = 2.5
    scaled = ScaledHull(scale=radius)
    w = random_feasible(scaled, g)
    c = radius * w[1:]
    expected = float((s * c).sum() - radius * s.min(dim=0).values.clamp(max=0).sum())
    assert fw_gap(scaled, w, vertex_scores(radius * s)) == pytest.approx(expected, abs=1e-12)


def test_box_k_best_points_are_the_k_best_per_tensor_for_k_up_to_3():
    g = torch.Generator().manual_seed(3)
    points = column_points(Box())
    for _ in range(20):
        vs = vertex_scores(torch.randn(N, L, generator=g, dtype=torch.float64))
        ranked = Box().ranked(ranking(vs, "layer", "inner_product"), L, 3)
        assert len(ranked) == 3
        for l in range(L):
            values = sorted(float(p @ vs[:, l]) for p in points)
            got = [float(p[:, l] @ vs[:, l]) for p in ranked]
            assert got == pytest.approx(values[:3], abs=1e-12)


def test_feasibility_checks_and_snaps():
    box = Box()
    outside = torch.tensor([[-0.5], [1.2], [0.3]], dtype=torch.float64)
    with pytest.raises(InfeasibleError):
        box.check(outside)
    box.check(box.snap(outside))
    box.check(torch.tensor([[-1.0], [1.0], [1.0]], dtype=torch.float64))  # total 2: the box allows it
    with pytest.raises(InfeasibleError):
        Hull().check(torch.tensor([[-1.0], [1.0], [1.0]], dtype=torch.float64))
    Hull().check(Hull().snap(torch.tensor([[-1e-17], [0.5], [0.5 + 1e-15]], dtype=torch.float64)))


def test_starting_at_the_initial_merge_gives_it_coefficient_one():
    for constraint in (Hull(), Box(), ScaledHull(scale=4.0)):
        w = constraint.start_at_init(4, 2)
        constraint.check(w)
        coefficients = w[1:] * constraint.scale
        torch.testing.assert_close(coefficients[-1], torch.ones(2, dtype=torch.float64))
        assert float(coefficients[:-1].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="radius >= 1"):
        ScaledHull(scale=0.5).start_at_init(4, 2)


def test_constraint_set_by_name_and_describe():
    assert constraint_set("scaled_hull", 3.0).scale == 3.0 and constraint_set("box").name == "box"
    with pytest.raises(ValueError, match="unknown constraint"):
        constraint_set("ball")
    point = torch.tensor([[0.0, 1.0, -1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    chosen, choice = describe(point, ["base", "a", "b"])
    assert chosen == {"base": 1, "a": 2, "b": 1} and choice == ["a", "base", "a+b"]


@pytest.mark.parametrize("constraint", SETS, ids=set_id)
@pytest.mark.parametrize("lmo", ["layer", "task"])
def test_away_point_and_longest_step_match_brute_force(constraint, lmo):
    """The away point is the worst-ranked point among those the iterate uses, and the
    longest step is the largest gamma the set admits (found by bisection on check)."""
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        vs = vertex_scores(torch.randn(N, L, generator=g, dtype=torch.float64))
        w = random_feasible(constraint, g)
        if lmo == "task":  # the task-wise LMO's iterates share one column
            w = w[:, :1].expand(-1, L).clone()
        if isinstance(inner_of(constraint), Box):  # one end of a box coefficient not in use (in every tensor, task-wise)
            w[1, : L if lmo == "task" else 1] = 0.0
        w = constraint.snap(w)
        rank = ranking(vs, lmo, "inner_product")
        worst = constraint.away(w, rank)
        assert worst is not None
        constraint.check(worst)
        columns = rank.unsqueeze(1).expand(-1, L) if rank.dim() == 1 else rank
        for l in range(L):
            used = [p for p in column_points(constraint) if _uses(constraint, w[:, l], p)]
            assert float(worst[:, l] @ columns[:, l]) == pytest.approx(max(float(p @ columns[:, l]) for p in used))
        for direction in (constraint.vertex(rank, L) - worst, w - worst):
            top = constraint.max_step(w, direction)
            if top == float("inf") or float(direction.abs().max()) < 1e-9:  # no move but rounding
                continue
            constraint.check(w + top * direction, atol=1e-9)
            with pytest.raises(InfeasibleError):
                constraint.check(w + (top + 1e-6) * direction, atol=1e-9)


def inner_of(constraint):
    return constraint.inner if isinstance(constraint, Face) else constraint


def _uses(constraint, column: torch.Tensor, point: torch.Tensor) -> bool:
    """Whether ``point`` is in the iterate's active set, in this column (a face's points
    are its inner set's, so the same rule)."""
    constraint = inner_of(constraint)
    if isinstance(constraint, Box):  # each coefficient: end 1 in use when c > 0, end 0 when c < 1
        c = column[1:]
        free = (c > 1e-12) & (c < 1 - 1e-12)
        ends = ((point[1:] == 1) & (c > 1e-12) | (point[1:] == 0) & (c < 1 - 1e-12)) | free
        if not isinstance(constraint, CappedBox):
            return bool(ends.all())
        # capped: fixed coefficients keep their end, and where the cap binds the point spends it
        binding = float(c.sum()) >= constraint.cap - 1e-9
        return bool(ends.all()) and (not binding or abs(float(point[1:].sum()) - constraint.cap) < 1e-9)
    return bool(column[int(point.argmax())] > 1e-12)


@pytest.mark.parametrize("constraint", SETS, ids=set_id)
def test_projection_is_the_nearest_point_by_the_variational_inequality(constraint):
    """p is the Euclidean projection of x onto a polytope iff <x - p, y - p> <= 0 for every
    extreme point y (every point of the set is a convex mix of them); checked per tensor,
    over the candidates' coefficients (the base row is 1 - their sum)."""
    g = torch.Generator().manual_seed(7)
    points = column_points(constraint)
    for spread in (0.3, 1.0, 3.0):
        for _ in range(20):
            x = torch.randn(1 + N, L, generator=g, dtype=torch.float64) * spread + 0.2
            p = constraint.project(x)
            constraint.check(p)
            for l in range(L):
                for y in points:
                    assert float((x[1:, l] - p[1:, l]) @ (y[1:] - p[1:, l])) <= 1e-12
            assert torch.equal(constraint.project(p), p) or torch.allclose(constraint.project(p), p, atol=1e-15)


def test_hull_projection_clamps_inside_the_cap_and_lands_on_the_face_above_it():
    hull = Hull()
    inside = torch.tensor([[0.0], [0.2], [-0.1], [0.3]], dtype=torch.float64)
    assert hull.project(inside)[1:, 0].tolist() == [0.2, 0.0, 0.3]
    above = torch.tensor([[0.0], [0.9], [0.6], [-1.0]], dtype=torch.float64)
    projected = hull.project(above)
    assert projected[1:, 0].tolist() == pytest.approx([0.65, 0.35, 0.0]) and float(projected[0, 0]) == pytest.approx(0.0)


def test_the_capped_box_is_the_box_from_n_and_the_hull_at_one():
    """With a cap of at least the number of candidates nothing binds (the box); at 1 the
    set is {c >= 0, sum c <= 1} (the hull): same points and projections."""
    g = torch.Generator().manual_seed(9)
    for _ in range(20):
        vs = vertex_scores(torch.randn(N, L, generator=g, dtype=torch.float64))
        rank = ranking(vs, "layer", "inner_product")
        x = torch.randn(1 + N, L, generator=g, dtype=torch.float64)
        assert torch.equal(CappedBox(cap=float(N)).vertex(rank, L), Box().vertex(rank, L))
        assert torch.equal(CappedBox(cap=float(N)).project(x), Box().project(x))
        assert torch.equal(CappedBox(cap=1.0).vertex(rank, L), Hull().vertex(rank, L))
        torch.testing.assert_close(CappedBox(cap=1.0).project(x), Hull().project(x), rtol=0, atol=1e-12)
    capped = constraint_set("capped_box", 2.0)
    assert isinstance(capped, CappedBox) and capped.cap == 2.0 and capped.scale == 1.0
    capped.check(capped.start_at_init(4, 2))
    with pytest.raises(ValueError, match="radius >= 1"):
        CappedBox(cap=0.5).start_at_init(4, 2)
    with pytest.raises(ValueError, match="radius > 0"):
        CappedBox(cap=0.0)
    with pytest.raises(InfeasibleError, match="cap"):
        capped.check(torch.tensor([[-1.5], [1.0], [1.0], [0.5]], dtype=torch.float64))


def test_a_face_is_its_set_on_the_kept_rows_and_refuses_weight_on_the_others():
    """A face of each set is that set over the kept candidates (the same kind of set with
    fewer of them), with the held rows at 0 in every point it gives."""
    g = torch.Generator().manual_seed(11)
    rows = torch.tensor(KEEP)
    for inner in (Hull(), Box(), CappedBox(cap=1.5)):
        face = Face(inner, KEEP)
        for _ in range(10):
            vs = vertex_scores(torch.randn(N, L, generator=g, dtype=torch.float64))
            rank = ranking(vs, "layer", "inner_product")
            point = face.vertex(rank, L)
            assert torch.equal(point[rows], inner.vertex(rank[rows], L)) and not bool(point[~rows].any())
            x = torch.randn(1 + N, L, generator=g, dtype=torch.float64)
            assert torch.equal(face.project(x)[rows], inner.project(x[rows]))
        inside = face.vertex(torch.zeros(1 + N), L)
        inside[2, 0], inside[0, 0] = 0.25, inside[0, 0] - 0.25  # weight on the held candidate
        with pytest.raises(InfeasibleError, match="holds at 0"):
            face.check(inside)
    with pytest.raises(ValueError, match="base"):
        Face(Box(), (False, True, True, True))
