"""The screen (``screen_per_task``): which members it keeps, against a plain count; and
every solver, given one, moves on the face of its set where the dropped members are 0
and reaches that face's optimum (scipy's QP over the kept candidates alone)."""

from __future__ import annotations

import pytest
import torch

from mergekit_fw.config import FrankWolfeParameters
from mergekit_fw.solve.constraints import Box
from mergekit_fw.solve.screen import Screen, screen_members
from mergekit_fw.solve.solver import Trace, load_checkpoint, solve
from mergekit_fw.solve.stochastic import solve_stochastic
from tests.toy import BatchedQuadratic


def test_each_task_keeps_its_lowest_members_with_rank_components_summed():
    names = ["a#r0", "a#r1", "a#full", "b#r0", "b#r1", "c", "d", "init"]
    # per task, per candidate row: a sums to -3 / +1, b to -1 / -4, c -2 / 0, d +1 / -0.5
    scores = torch.tensor([
        [-1.0, -1.5, -0.5, -2.0, 1.0, -2.0, 1.0, -9.0],
        [0.5, 0.5, 0.0, -2.0, -2.0, 0.0, -0.5, -9.0],
    ])
    screen = screen_members(scores, names, ["t0", "t1"], 2, always={"init"})
    assert screen.by_task == {"t0": ["a", "c"], "t1": ["b", "d"]}
    assert screen.kept == ["a", "b", "c", "d"] and screen.dropped == []
    screen = screen_members(scores, names, ["t0", "t1"], 1, always={"init"})
    assert screen.by_task == {"t0": ["a"], "t1": ["b"]}
    assert screen.kept == ["a", "b"] and screen.dropped == ["c", "d"]  # init is never screened
    face = screen.face(Box(), names)
    assert face.keep == (True, True, True, True, True, True, False, False, True)
    # a member the start uses is kept whatever it scores
    used = torch.tensor([False] * 6 + [True, False])
    assert screen_members(scores, names, ["t0", "t1"], 1, always={"init"}, in_use=used).kept == ["a", "b", "d"]
    assert Screen.from_json(screen.to_json()) == screen


def _random_pools(seed: int, shift: float = 0.0, most_per_task: int = 3):
    """50 pools of 6 members of 1-3 rank components each, scored on 3 tasks: the names,
    the scores, a count a task, and each member's summed score per task."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(50):
        members = [f"m{i}" for i in range(6)]
        parts = [int(n) for n in torch.randint(1, 4, (6,), generator=g)]
        names = [f"{m}#r{j}" for m, n in zip(members, parts) for j in range(n)]
        scores = torch.randn(3, len(names), generator=g, dtype=torch.float64) + shift
        per_task = int(torch.randint(1, most_per_task + 1, (1,), generator=g))
        totals = {m: [float(sum(scores[t, i] for i, n in enumerate(names) if n.startswith(m + "#"))) for t in range(3)]
                  for m in members}
        yield members, names, scores, per_task, totals


def test_the_kept_members_are_the_union_of_each_tasks_lowest_by_brute_force():
    for members, names, scores, per_task, totals in _random_pools(3):
        screen = screen_members(scores, names, ["x", "y", "z"], per_task)
        expected = set()
        for t in range(3):
            # a member is kept for task t when fewer than per_task members score below it
            expected |= {m for m in members if sum(totals[o][t] < totals[m][t] for o in members) < per_task}
        assert set(screen.kept) == expected and set(screen.dropped) == set(members) - expected
        assert all(len(top) == per_task for top in screen.by_task.values())


def test_after_a_tasks_first_member_the_floor_keeps_only_a_comparable_fall():
    names = ["own", "near", "noise", "other"]
    # t0: own falls 1.0, near 0.3 of that, noise 0.04; t1: nothing falls (two members level at 0)
    scores = torch.tensor([[-1.0, -0.3, -0.04, 0.2], [0.3, 0.0, 0.2, 0.0]], dtype=torch.float64)
    plain = screen_members(scores, names, ["t0", "t1"], 3)
    assert plain.by_task == {"t0": ["own", "near", "noise"], "t1": ["near", "other", "noise"]}
    screen = screen_members(scores, names, ["t0", "t1"], 3, floor=0.1)
    # a task where no member falls keeps its first only
    assert screen.by_task == {"t0": ["own", "near"], "t1": ["near"]}
    assert screen.kept == ["own", "near"] and screen.dropped == ["noise", "other"]
    assert screen_members(scores, names, ["t0", "t1"], 3, floor=0.3).by_task["t0"] == ["own", "near"]  # at the floor
    assert screen_members(scores, names, ["t0", "t1"], 3, floor=0.31).by_task["t0"] == ["own"]
    assert Screen.from_json(screen.to_json()) == screen and screen.floor == 0.1
    # a trace written before the floor existed reads back with none
    old = {k: v for k, v in plain.to_json().items() if k != "floor"}
    assert Screen.from_json(old) == plain


def test_the_floor_keeps_what_a_brute_force_rule_keeps():
    floors = torch.rand(50, generator=torch.Generator().manual_seed(6)).tolist()
    for floor, (members, names, scores, per_task, totals) in zip(floors, _random_pools(5, shift=-0.3, most_per_task=4)):
        screen = screen_members(scores, names, ["x", "y", "z"], per_task, floor=floor)
        expected = set()
        for t in range(3):
            best = min(totals[m][t] for m in members)
            for m in members:
                among_lowest = sum(totals[o][t] < totals[m][t] for o in members) < per_task
                first = totals[m][t] == best
                steep = best < 0 and totals[m][t] <= floor * best
                if among_lowest and (first or steep):
                    expected.add(m)
        assert set(screen.kept) == expected and set(screen.dropped) == set(members) - expected


def _face_rows(trace, n: int) -> list[int]:
    """The candidate rows the screen dropped."""
    dropped = set(trace.screen["dropped"])
    return [i for i in range(n) if f"c{i}" in dropped]


def _expected_screen(toy: BatchedQuadratic, constraint: str, per_task: int, floor: float = 0.0) -> Screen:
    table = toy.table(constraint)
    task_scores = toy.evaluate(table.coefficients(), per_task=True).task_scores.sum(dim=2)
    return screen_members(task_scores, table.candidates, [f"task {t}" for t in range(3)], per_task, floor=floor)


FW = {
    "paper": dict(iterations=400, step="line_search", line_search_steps=40, direction="frank_wolfe"),
    "defaults": dict(iterations=300),
}


@pytest.mark.parametrize("settings", list(FW))
@pytest.mark.parametrize("constraint", ["box", "hull"])
def test_hard_fw_with_a_screen_stays_on_its_face_and_reaches_the_faces_optimum(constraint, settings):
    toy = BatchedQuadratic(6, 3, 5, seed=4, batches_per_task=(1, 1, 1))
    params = FrankWolfeParameters(calibration="unused.jsonl", constraint=constraint, epsilon_relative=0.0,
                                  screen_per_task=1, screen_by="slope", **FW[settings])
    held: list[float] = []
    trace = Trace()  # the solve fills it; the check reads its screen

    def check(table, record) -> None:
        table.constraint_set.check(table.weights)
        held.append(float(table.weights[[1 + i for i in _face_rows(trace, 6)]].abs().sum()))

    table, trace = solve(toy, toy.table(constraint), params, trace=trace, progress=False, on_iteration=check)
    expected = _expected_screen(toy, constraint, 1, floor=params.screen_floor)
    assert trace.screen == expected.to_json() and expected.dropped  # the screen drops some of the 6
    assert held and max(held) == 0.0  # every iterate left the dropped members at exactly 0
    # the oracle held them (scored 0 from then on) for the solve, and let them go at its end
    assert toy.holds == [_face_rows(trace, 6), []]
    kept = [int(name[1:]) for name in expected.kept]
    best = toy.restricted(kept).optimum_loss(constraint)
    assert best - 1e-9 <= trace.final_loss <= best + 1e-3 * max(1.0, best)
    assert toy.optimum_loss(constraint) < best - 1e-3  # the face's optimum is not the set's
    assert trace.passes["gradient"] == len(trace.iterations)  # the screen took no pass of its own


@pytest.mark.parametrize("solver", ["projected_gradient", "stochastic_frank_wolfe"])
def test_the_gradient_solvers_screen_on_one_full_pass_and_reach_the_faces_optimum(solver):
    toy = BatchedQuadratic(6, 3, 5, seed=4, batches_per_task=(1, 1, 1))  # one batch a task: exact gradients
    params = FrankWolfeParameters(calibration="unused.jsonl", solver=solver, constraint="box", gradient_steps=3000,
                                  screen_per_task=1, screen_by="slope")
    held: list[float] = []
    trace = Trace()
    table, trace = solve_stochastic(
        toy, toy.table("box"), params, trace=trace, progress=False,
        on_iteration=lambda t, r: held.append(float(t.weights[[1 + i for i in _face_rows(trace, 6)]].abs().sum())),
    )
    expected = _expected_screen(toy, "box", 1, floor=params.screen_floor)
    assert trace.screen == expected.to_json() and expected.dropped and max(held) == 0.0
    assert toy.holds == [_face_rows(trace, 6), []]
    best = toy.restricted([int(name[1:]) for name in expected.kept]).optimum_loss("box")
    assert best - 1e-9 <= trace.final_loss <= best + 1e-3 * max(1.0, best)
    # the first full pass (per task), the 3000 steps of a batch per task (3 of 3 batches = a
    # pass each) and the final loss
    assert trace.passes["gradient"] == pytest.approx(1 + 3000) and trace.passes["forward"] == pytest.approx(1)


@pytest.mark.parametrize("run", ["fw", "projected_gradient", "stochastic_frank_wolfe"])
def test_every_solver_screens_with_the_floor_it_is_given(run):
    toy = BatchedQuadratic(6, 3, 5, seed=4, batches_per_task=(1, 1, 1))
    go = solve if run == "fw" else solve_stochastic
    extra = {"iterations": 5} if run == "fw" else {"solver": run, "gradient_steps": 5}
    params = FrankWolfeParameters(calibration="unused.jsonl", constraint="box", screen_per_task=3, screen_floor=0.5,
                                  screen_by="slope", **extra)
    _, trace = go(toy, toy.table("box"), params, progress=False)
    expected = _expected_screen(toy, "box", 3, floor=0.5)
    assert trace.screen == expected.to_json()
    assert set(expected.dropped) > set(_expected_screen(toy, "box", 3).dropped)  # the floor drops more here
    assert toy.holds == [_face_rows(trace, 6), []]


@pytest.mark.parametrize("run", ["fw", "projected_gradient"])
def test_a_screen_that_keeps_every_member_changes_nothing(run):
    toy = BatchedQuadratic(4, 2, 5, seed=6, batches_per_task=(1, 1, 1))
    go = (lambda p: solve(toy, toy.table("box"), p, progress=False)) if run == "fw" else (
        lambda p: solve_stochastic(toy, toy.table("box"), p, progress=False))
    extra = {"iterations": 20} if run == "fw" else {"solver": run, "gradient_steps": 50}
    plain, _ = go(FrankWolfeParameters(calibration="unused.jsonl", constraint="box", screen_per_task=0, **extra))
    screened, trace = go(FrankWolfeParameters(calibration="unused.jsonl", constraint="box", screen_per_task=3,
                                              screen_floor=0.0, screen_by="slope", **extra))
    assert trace.screen["dropped"] == [] and len(trace.screen["kept"]) == 4
    assert torch.equal(screened.weights, plain.weights)


@pytest.mark.parametrize("run", ["fw", "projected_gradient"])
def test_a_killed_screened_solve_resumes_on_its_face_to_the_same_bits(tmp_path, run):
    """The screen is chosen once, at the start, and kept in the trace: a resumed solve
    moves on the same face (it does not screen again from wherever it stopped)."""

    class Killed(Exception):
        pass

    def kill(table, record):
        if record.iteration == 12:  # past the stochastic solvers' checkpoint at step 10
            raise Killed

    def toy() -> BatchedQuadratic:
        return BatchedQuadratic(6, 3, 5, seed=4, batches_per_task=(1, 1, 1))

    extra = {"iterations": 15, "epsilon_relative": 0.0} if run == "fw" else {"solver": run, "gradient_steps": 15}
    params = FrankWolfeParameters(calibration="unused.jsonl", constraint="box", screen_per_task=1, **extra)
    go = solve if run == "fw" else solve_stochastic
    whole, whole_trace = go(toy(), toy().table("box"), params, progress=False)
    path = tmp_path / "checkpoint.json"
    killed = toy()
    with pytest.raises(Killed):
        go(killed, killed.table("box"), params, checkpoint=path, progress=False, on_iteration=kill)
    assert killed.holds == [_face_rows(whole_trace, 6), []]  # let go of, though the solve died
    saved = load_checkpoint(path)
    assert saved is not None and saved.trace.screen == whole_trace.screen
    state = {"state": saved.extra} if run != "fw" else {}
    again = toy()
    resumed, trace = go(again, saved.table, params, checkpoint=path, trace=saved.trace, progress=False, **state)
    assert torch.equal(resumed.weights, whole.weights) and trace.screen == whole_trace.screen
    assert again.holds == [_face_rows(trace, 6), []] and _face_rows(trace, 6)  # resumed: the same hold


def test_the_screen_setting_is_a_count_on_by_default_and_off_at_zero():
    from mergekit_fw.config import ConfigError, parse_parameters

    assert FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe").screen_per_task == 1
    with pytest.raises(ConfigError, match="screen_per_task"):
        parse_parameters({"calibration": "x.jsonl", "screen_per_task": -1})
    with pytest.raises(ConfigError, match="screen_per_task"):
        parse_parameters({"calibration": "x.jsonl", "screen_per_task": 1.5})
    # off, it stays out of the fingerprint, so solves cached before it existed stay valid
    fields = FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe", screen_per_task=0).fingerprint_fields()
    assert "screen_per_task" not in fields
    assert FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe").fingerprint_fields()["screen_per_task"] == 1
    assert FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe", screen_per_task=2).fingerprint_fields()["screen_per_task"] == 2


def test_the_floor_is_a_fraction_that_counts_only_under_the_screen():
    from mergekit_fw.config import ConfigError, parse_parameters

    for bad in (-0.1, 1.0, "a"):
        with pytest.raises(ConfigError, match="screen_floor"):
            parse_parameters({"calibration": "x.jsonl", "screen_floor": bad})
    assert FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe").screen_floor == 0.1
    # from 2 a task the floor decides who is kept, so a solve cached under another floor (or
    # before the floor existed) is not reused
    fields = FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe", screen_per_task=2).fingerprint_fields()
    assert fields["screen_floor"] == 0.1
    assert FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe", screen_per_task=2, screen_floor=0.5).fingerprint_fields() != fields
    # at 1 a task (the default) it judges no second place: any floor is the same solve
    one = FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe").fingerprint_fields()
    assert "screen_floor" not in one and one["screen_by"] == "both"
    assert FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe", screen_floor=0.5).fingerprint_fields() == one
    # a floor without a screen changes nothing, and a floor of 0 is what solves before it did
    assert "screen_floor" not in FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe", screen_per_task=0,
                                                      screen_floor=0.1).fingerprint_fields()
    assert "screen_floor" not in FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe", screen_floor=0.0).fingerprint_fields()



class FlatHelp:
    """Two tasks, three members, one tensor; not convex, as a model's loss is not.
    Task 0: (1 - c_a)^2, its own member ``a`` falls steeply from the start. Task 1:
    1 - 0.005 c_b - 0.895 c_b^2 - 0.02 c_n + 0.5 c_n^2: its own member ``b`` is nearly flat
    at the base (slope -0.005) yet alone lowers the loss from 1 to 0.1, while ``n`` falls
    faster at the start (-0.02) and alone raises it to 1.48 (a member whose first slope is
    the rows' noise)."""

    names = ["a", "b", "n"]

    def __init__(self) -> None:
        self.held: list[int] = []
        self.calls = {"loss": 0, "task_losses": 0, "evaluate": 0}

    def _tasks(self, c: torch.Tensor) -> torch.Tensor:
        a, b, n = (float(c[i, 0]) for i in range(3))
        return torch.tensor([(1 - a) ** 2, 1 - 0.005 * b - 0.895 * b**2 - 0.02 * n + 0.5 * n**2], dtype=torch.float64)

    def hold(self, rows) -> None:
        self.held = sorted(set(rows))

    def loss(self, c: torch.Tensor) -> float:
        self.calls["loss"] += 1
        return float(self._tasks(c).sum())

    def task_losses(self, c: torch.Tensor) -> torch.Tensor:
        self.calls["task_losses"] += 1
        return self._tasks(c)

    def evaluate(self, c: torch.Tensor, *, per_task: bool = False):
        from mergekit_fw.oracle import Evaluation

        self.calls["evaluate"] += 1
        assert not any(float(c[i, 0]) for i in self.held), "a point moves a held row"
        a, b, n = (float(c[i, 0]) for i in range(3))
        task_scores = torch.zeros(2, 3, 1, dtype=torch.float64)
        task_scores[0, 0, 0] = -2 * (1 - a)
        task_scores[1, 1, 0] = -0.005 - 1.79 * b
        task_scores[1, 2, 0] = -0.02 + n
        task_scores[:, self.held] = 0.0
        losses = self._tasks(c)
        return Evaluation(float(losses.sum()), task_scores.sum(dim=0), losses, task_scores if per_task else None)

    def vertex_norms(self) -> torch.Tensor:
        return torch.ones(3, 1, dtype=torch.float64)

    def table(self):
        from mergekit_fw.solve.table import CoefficientTable

        table = CoefficientTable.at_base(self.names, ["t0"], "toy", "toy")
        table.constraint = "box"
        table.meta["tasks"] = ["own_a", "own_b"]
        return table


@pytest.mark.parametrize("by", ["slope", "loss", "both"])
def test_ranked_by_its_loss_alone_a_tasks_flat_specialist_is_kept(by):
    """The miss the loss signal mends: by slope, task 1's place goes to the noise member and
    its own member is held at 0 (its loss stays near 1); by loss the own member is kept;
    by both, what either keeps (a task's places by slope first)."""
    oracle = FlatHelp()
    params = FrankWolfeParameters(calibration="unused.jsonl", constraint="box", iterations=10, screen_per_task=1,
                                  screen_by=by)
    table, trace = solve(oracle, oracle.table(), params, progress=False)
    own = {"slope": ["n"], "loss": ["b"], "both": ["n", "b"]}[by]
    assert trace.screen["by"] == by and trace.screen["by_task"] == {"own_a": ["a"], "own_b": own}
    assert trace.screen["kept"] == {"slope": ["a", "n"], "loss": ["a", "b"], "both": ["a", "b", "n"]}[by]
    assert trace.screen["dropped"] == {"slope": ["b"], "loss": ["n"], "both": []}[by]
    if by == "both":  # the own members at full weight, and n towards its small help (at best -0.0002)
        assert 0.1 - 0.0002 - 1e-9 <= trace.final_loss <= 0.1
    if by == "loss":
        assert trace.final_loss == pytest.approx(0.1, abs=1e-6)  # both tasks' own members at full weight
    if by != "slope":
        # one forward pass for each member alone, and none for the base: the start is the base,
        # whose task losses the first gradient's pass already gave
        assert oracle.calls["task_losses"] == 3
    else:
        assert trace.final_loss > 0.95 and oracle.calls["task_losses"] == 0
    # every forward pass the solve made is in its trace: the line searches' and the screen's
    assert trace.passes["forward"] == oracle.calls["loss"] + oracle.calls["task_losses"]
    assert trace.passes["gradient"] == oracle.calls["evaluate"]


def test_screened_by_both_where_the_slope_keeps_every_member_the_loss_pass_is_not_spent():
    """The loss can add nothing to a screen that holds no member at 0 (asked = pool, each
    task's own adapter among its steepest): its pass per member is saved, and the places
    are the slope's. Where the slope holds one at 0, the pass is spent (the test above)."""
    runs = {}
    for by in ("slope", "loss", "both"):
        oracle = FlatHelp()
        params = FrankWolfeParameters(calibration="unused.jsonl", constraint="box", iterations=10, screen_per_task=3,
                                      screen_floor=0.0, screen_by=by)
        _, trace = solve(oracle, oracle.table(), params, progress=False)
        assert trace.screen["by"] == by and trace.screen["dropped"] == []
        assert trace.passes["forward"] == oracle.calls["loss"] + oracle.calls["task_losses"]
        runs[by] = (trace.screen["by_task"], oracle.calls["task_losses"])
    assert [runs[by][1] for by in ("slope", "loss", "both")] == [0, 3, 0]
    assert runs["both"][0] == runs["slope"][0] != runs["loss"][0]


def test_each_members_fall_alone_is_its_task_losses_at_full_weight_minus_the_bases():
    """Against a brute-force reading of the toy: each member's rows (its rank components)
    at 1 and every other row at 0; the initial merge's row is never a member."""
    from mergekit_fw.solve.screen import alone_falls

    toy = BatchedQuadratic(5, 2, 4, seed=9, batches_per_task=(1, 2, 1))
    names = ["m0#r0", "m0#r1", "m1", "m2#r0", "init"]  # toy rows 0-4
    members, falls, spent = alone_falls(toy, names, 2, always={"init"})
    assert members == ["m0", "m1", "m2"] and spent == 4  # the base, then each member
    base = toy.task_losses(torch.zeros(5, 2, dtype=torch.float64))
    for m, rows in enumerate([[0, 1], [2], [3]]):
        alone = torch.zeros(5, 2, dtype=torch.float64)
        alone[rows] = 1.0
        assert torch.allclose(falls[:, m], toy.task_losses(alone) - base, rtol=0, atol=1e-12)
    known = alone_falls(toy, names, 2, always={"init"}, at_base=base)
    assert known[2] == 3 and torch.equal(known[1], falls)  # the base's losses given: one pass fewer


@pytest.mark.parametrize("solver", ["projected_gradient", "stochastic_frank_wolfe"])
def test_the_gradient_solvers_screen_by_loss_alone_and_count_its_passes(solver):
    from mergekit_fw.solve.screen import alone_falls, choose_members

    toy = BatchedQuadratic(6, 3, 5, seed=4, batches_per_task=(1, 1, 1))
    params = FrankWolfeParameters(calibration="unused.jsonl", solver=solver, constraint="box", gradient_steps=20,
                                  screen_per_task=1, screen_by="loss")
    _, trace = solve_stochastic(toy, toy.table("box"), params, progress=False)
    fresh = BatchedQuadratic(6, 3, 5, seed=4, batches_per_task=(1, 1, 1))
    table = fresh.table("box")
    members, falls, _ = alone_falls(fresh, table.candidates, 3)
    expected = choose_members(members, falls, table.candidates, [f"task {t}" for t in range(3)], 1,
                              floor=params.screen_floor, by="loss")
    assert trace.screen == expected.to_json() and expected.dropped
    assert expected != _expected_screen(toy, "box", 1, floor=params.screen_floor)  # the signals differ here
    # each of the 6 members alone (the base's losses came with the first full pass) and the final loss
    assert trace.passes["forward"] == pytest.approx(6 + 1) and trace.passes["gradient"] == pytest.approx(1 + 20)


def test_screen_by_is_slope_loss_or_both_and_counts_only_under_the_screen():
    from mergekit_fw.config import ConfigError, parse_parameters

    assert FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe").screen_by == "both"  # the default since 2026-12-07
    with pytest.raises(ConfigError, match="screen_by"):
        parse_parameters({"calibration": "x.jsonl", "screen_by": "gradient"})
    # slope is what solves before it did: left out of the fingerprint, as is any choice without a screen
    assert "screen_by" not in FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe", screen_by="slope").fingerprint_fields()
    assert FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe").fingerprint_fields()["screen_by"] == "both"
    assert "screen_by" not in FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe", screen_per_task=0,
                                                   screen_by="loss").fingerprint_fields()
    assert FrankWolfeParameters(calibration="x.jsonl", solver="frank_wolfe", screen_by="loss").fingerprint_fields()["screen_by"] == "loss"
    # a trace written before the setting reads back as ranked by slope
    old = {"per_task": 2, "floor": 0.1, "by_task": {"t": ["a"]}, "kept": ["a"], "dropped": ["b"]}
    assert Screen.from_json(old).by == "slope" and Screen.from_json(old).to_json() == {**old, "by": "slope"}


@pytest.mark.slow
def test_a_screened_merge_names_every_member_and_says_what_it_kept(random_pool, tmp_path):
    """Through ``mergekit-fw run`` and ``mergekit-yaml`` (the same tensors): the table keeps
    a row for every member, the dropped ones at exactly 0 on every tensor; the trace, the
    summary and the model card name what was kept and why."""
    import json

    from tests.paths import assert_same_tensors, mergekit_fw_here, mergekit_yaml, tensors, write_config

    base = str(random_pool["base"])
    models = [{"model": f"{base}+{a}"} for a in random_pool["adapters"]] + [
        {"model": str(d)} for d in random_pool["dense"]]
    fw = write_config(tmp_path / "fw.yml", {
        "merge_method": "frank_wolfe", "base_model": base, "models": models, "dtype": "float32",
        "parameters": {"calibration": str(random_pool["calibration"]), "iterations": 3, "screen_per_task": 1},
    })
    output = mergekit_fw_here(fw, tmp_path / "fast")
    mergekit_yaml(fw, tmp_path / "yaml")
    assert_same_tensors(tensors(tmp_path / "fast"), tensors(tmp_path / "yaml"))
    trace = json.loads((tmp_path / "fast" / "fw_trace.json").read_text())
    table = json.loads((tmp_path / "fast" / "fw_table.json").read_text())
    screen = trace["screen"]
    # screen_by both (the default): a task's steepest member and its best alone, one or two members
    assert set(screen["by_task"]) == {"reverse", "sort"} and all(len(v) in (1, 2) for v in screen["by_task"].values())
    assert screen["by"] == "both"
    names = [m["model"] for m in models]
    assert sorted(screen["kept"] + screen["dropped"]) == sorted(names) and len(screen["dropped"]) >= len(names) - 4
    # a member's rows: itself, or its rank components (granularity auto, from 50 rows a task)
    rows = {name: [i for i, c in enumerate(table["candidates"]) if c.split("#")[0] == name] for name in names}
    assert all(rows.values())  # every member keeps its rows in the table
    coefficients = torch.tensor(list(table["coefficients"].values()), dtype=torch.float64)  # (tensors, candidates)
    for name in screen["dropped"]:
        assert float(coefficients[:, rows[name]].abs().max()) == 0.0
    assert float(coefficients[:, [i for n in screen["kept"] for i in rows[n]]].abs().max()) > 0.0
    card = (tmp_path / "fast" / "README.md").read_text()
    assert "**Screened** (`screen_per_task: 1`, `screen_by: both`)" in card
    assert all(f"`{name}`" in card.split("Held at 0:")[1] for name in screen["dropped"])
    assert f"held at 0: {', '.join(screen['dropped'])}" in output


def test_screened_by_both_a_task_keeps_what_either_signal_keeps_by_brute_force():
    from mergekit_fw.solve.screen import choose_members, joined

    g = torch.Generator().manual_seed(11)
    for _ in range(50):
        names = [f"m{i}" for i in range(6)]
        slope, loss = (torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(2))
        per_task = int(torch.randint(1, 3, (1,), generator=g))
        tasks = ["x", "y", "z"]
        each = [choose_members(names, signal, names, tasks, per_task, floor=0.1, by=by)
                for signal, by in ((slope, "slope"), (loss, "loss"))]
        both = joined(each, names)
        for t, task in enumerate(tasks):
            # a task's places: its lowest by slope (with the floor), then its lowest by loss not already there
            ranked = [[names[i] for i in sorted(range(6), key=lambda i: float(signal[t, i]))] for signal in (slope, loss)]
            firsts = [
                [m for n, m in enumerate(order[:per_task])
                 if n == 0 or (float(signal[t, names.index(order[0])]) < 0
                               and float(signal[t, names.index(m)]) <= 0.1 * float(signal[t, names.index(order[0])]))]
                for order, signal in zip(ranked, (slope, loss))
            ]
            assert both.by_task[task] == firsts[0] + [m for m in firsts[1] if m not in firsts[0]]
        chosen = {m for places in both.by_task.values() for m in places}
        assert both.kept == [n for n in names if n in chosen] and both.dropped == [n for n in names if n not in chosen]
        assert both.by == "both" and Screen.from_json(both.to_json()) == both


def test_from_a_start_off_the_base_the_loss_screen_measures_falls_from_the_base():
    """The start's task losses stand in for the base's only when the start is the base;
    elsewhere the base's own pass is spent, and the falls are measured from it."""
    from mergekit_fw.solve.screen import alone_falls, choose_members

    toy = BatchedQuadratic(6, 3, 5, seed=4, batches_per_task=(1, 1, 1))
    calls: list[torch.Tensor] = []
    plain = toy.task_losses
    toy.task_losses = lambda c: calls.append(c.clone()) or plain(c)  # type: ignore[method-assign]
    table = toy.table("box")
    table.weights[1], table.weights[0] = 0.5, 0.5  # the start uses member c0 at half weight
    params = FrankWolfeParameters(calibration="unused.jsonl", constraint="box", iterations=3, screen_per_task=1,
                                  screen_by="loss")
    _, trace = solve(toy, table, params, progress=False)
    assert len(calls) == 1 + 6 and not bool(calls[0].any())  # the base first, then each member alone
    fresh = BatchedQuadratic(6, 3, 5, seed=4, batches_per_task=(1, 1, 1))
    members, falls, _ = alone_falls(fresh, table.candidates, 3)
    in_use = torch.tensor([True] + [False] * 5)
    expected = choose_members(members, falls, table.candidates, [f"task {t}" for t in range(3)], 1,
                              floor=params.screen_floor, in_use=in_use, by="loss")
    assert trace.screen == expected.to_json() and "c0" in expected.kept
