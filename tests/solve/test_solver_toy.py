"""The solver on a convex toy problem (no model): a quadratic over the convex
hull of random points, one hull per tensor, with a known optimum."""

import math

import pytest
import torch

from mergekit_fw.config import FrankWolfeParameters
from mergekit_fw.oracle import Evaluation
from mergekit_fw.solve.solver import solve
from mergekit_fw.solve.table import CoefficientTable
from tests.toy import QuadraticOracle, paper_settings


def _params(**settings) -> FrankWolfeParameters:
    return FrankWolfeParameters(calibration="unused.jsonl", **paper_settings(**settings))


def _first_within(trace, tolerance: float):
    return next((r.iteration for r in trace.iterations if r.loss < tolerance), None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_fw_with_line_search_reaches_the_optimum_and_the_gap_closes(seed):
    oracle = QuadraticOracle(6, 3, 4, seed, inside=True)  # optimum: loss 0
    _, trace = solve(oracle, oracle.table(), _params(iterations=400, line_search_steps=40), progress=False)
    assert trace.final_loss < 1e-3
    gaps = [r.gap for r in trace.iterations]
    assert gaps[-1] < 0.02 * gaps[0] and gaps[-1] < 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_fw_reaches_the_optimum_in_fewer_iterations(seed):
    hard = QuadraticOracle(6, 3, 4, seed, inside=True)
    _, hard_trace = solve(hard, hard.table(), _params(iterations=400, line_search_steps=40), progress=False)
    soft = QuadraticOracle(6, 3, 4, seed, inside=True)
    settings = dict(variant="soft", top_k=7, inner_steps=50, inner_lr=0.05, iterations=40)
    _, soft_trace = solve(soft, soft.table(), _params(**settings), progress=False)
    hard_at, soft_at = _first_within(hard_trace, 1e-3), _first_within(soft_trace, 1e-3)
    assert hard_at is not None and soft_at is not None
    assert soft_at < hard_at


def test_soft_fw_matches_the_qp_optimum_on_a_face():
    """Target outside the hulls: the optimum lies on a face; scipy's QP knows it."""
    oracle = QuadraticOracle(5, 2, 6, seed=3)
    optimum = oracle.optimum()
    _, trace = solve(oracle, oracle.table(), _params(variant="soft", top_k=6, inner_steps=100, inner_lr=0.05, iterations=30), progress=False)
    assert abs(trace.final_loss - optimum) < 1e-3
    assert trace.final_loss >= optimum - 1e-9  # never below the true minimum: iterates are feasible


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(step="schedule"),
        dict(step="quadratic"),
        dict(direction="away"),
        dict(direction="pairwise", step="quadratic"),
        dict(direction="pairwise", lmo="task"),
        dict(direction="projected_pairwise", step="quadratic"),
        dict(direction="projected_pairwise", lmo="task"),
        dict(step="adaptive"),
        dict(direction="projected_pairwise", step="adaptive"),
        dict(step="fixed", gamma=0.5),
        dict(lmo="task"),
        dict(lmo_score="cosine"),
        dict(variant="soft", top_k=2),
        dict(variant="soft", top_k=3, inner_weights="task", lmo="task"),
        dict(variant="soft", top_k=2, lmo_score="cosine"),
    ],
)
@pytest.mark.parametrize("constraint", [("hull", None), ("box", None), ("scaled_hull", 2.5), ("capped_box", 2.0)],
                         ids=lambda c: c[0])
def test_every_iterate_is_feasible_and_monotone_steps_never_raise_the_loss(settings, constraint):
    oracle = QuadraticOracle(5, 4, 3, seed=7)
    seen = []
    table = oracle.table(*constraint)
    solve(oracle, table, _params(iterations=8, **settings), progress=False,
          on_iteration=lambda table, record: seen.append((table.weights.clone(), record)))
    assert seen
    for weights, record in seen:
        table.constraint_set.check(weights)
        assert record.gap >= -1e-12
        if record.loss_after is not None:  # line search and soft steps know their loss
            assert record.loss_after <= record.loss + 1e-12
            assert abs(record.loss_after - oracle.loss(table.coefficients_for(weights))) < 1e-9


@pytest.mark.parametrize("variant", [dict(), dict(variant="soft", top_k=3)])
def test_taskwise_and_layerwise_agree_with_one_tensor(variant):
    runs = []
    for lmo in ("layer", "task"):
        oracle = QuadraticOracle(5, 1, 4, seed=11)
        extra = {"inner_weights": lmo} if variant else {}
        table, trace = solve(oracle, oracle.table(), _params(iterations=6, lmo=lmo, **variant, **extra), progress=False)
        runs.append((table.weights, [r.loss for r in trace.iterations]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=1e-12)
    assert runs[0][1] == pytest.approx(runs[1][1], abs=1e-12)


@pytest.mark.parametrize("constraint", [("box", None), ("scaled_hull", 3.0), ("capped_box", 1.5)], ids=lambda c: c[0])
def test_hard_and_soft_fw_reach_the_qp_optimum_of_the_larger_sets(constraint):
    """A target beyond the hull: the box, the scaled hull and the capped box reach further,
    and FW finds their optimum (scipy's QP on the same set), never below it."""
    kind, radius = constraint
    oracle = QuadraticOracle(5, 2, 6, seed=3)
    optimum = oracle.optimum(kind, radius or 1.0)
    assert optimum < oracle.optimum("hull") - 1e-3  # the larger set matters here
    if kind == "capped_box":  # and the cap binds: the box reaches further still
        assert oracle.optimum("box") < optimum - 1e-3
    for settings in (dict(iterations=300, line_search_steps=40),
                     dict(variant="soft", top_k=3, inner_steps=100, inner_lr=0.05, iterations=40)):
        _, trace = solve(oracle, oracle.table(kind, radius), _params(**settings), progress=False)
        assert trace.final_loss >= optimum - 1e-9
        assert trace.final_loss - optimum < 2e-3 * max(1.0, optimum), settings


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_the_defaults_stop_on_the_relative_gap_with_the_gap_as_certificate(seed):
    """mergekit-fw's defaults (box, projected pairwise, quadratic step, <= 30 iterations, stop at
    1% of the first gap) on a target beyond the hull: every iterate in the box, the loss
    never rises, and the last gap bounds how far the result is from the QP's optimum."""
    oracle = QuadraticOracle(5, 2, 6, seed=seed)
    params = FrankWolfeParameters(calibration="unused.jsonl", screen_per_task=0)  # one task: the whole box
    optimum = oracle.optimum("box")
    _, trace = solve(oracle, oracle.table(params.constraint), params, progress=False)
    losses = [r.loss for r in trace.iterations]
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
    assert any(r.direction == "projected_pairwise" for r in trace.iterations)
    first, last = trace.iterations[0].gap, trace.iterations[-1].gap
    if len(trace.iterations) < params.iterations:
        assert "epsilon_relative" in trace.stopped and last <= 0.01 * first
    assert optimum - 1e-9 <= trace.final_loss <= optimum + last + 1e-9


def test_the_recorded_gap_is_in_coefficient_units_of_the_set():
    """From the base, the scaled hull's gap is -R sum_l min(0, min_i s_il) and the box's
    -sum min(s, 0), with s = d loss / d c (ALGORITHM.md)."""
    oracle = QuadraticOracle(4, 3, 5, seed=9)
    s = oracle.evaluate(torch.zeros(4, 3, dtype=torch.float64)).scores
    for kind, radius, expected in (("scaled_hull", 3.0, -3.0 * s.min(dim=0).values.clamp(max=0).sum()),
                                   ("box", None, -s.clamp(max=0).sum())):
        _, trace = solve(oracle, oracle.table(kind, radius), _params(iterations=1), progress=False)
        assert trace.iterations[0].gap == pytest.approx(float(expected), rel=1e-12)


def test_epsilon_stops_and_the_trace_says_why():
    oracle = QuadraticOracle(4, 2, 3, seed=5)
    _, trace = solve(oracle, oracle.table(), _params(iterations=50, epsilon=1e9), progress=False)
    assert len(trace.iterations) == 1 and "epsilon" in trace.stopped
    _, trace = solve(oracle, oracle.table(), _params(iterations=3), progress=False)
    assert trace.stopped == "reached iterations = 3"


class ScriptedOracle:
    """Scores fixed per call, to follow the update rule by hand."""

    def __init__(self, scripts, norms):
        self.scripts, self.norms, self.calls = scripts, norms, 0

    def evaluate(self, coefficients, *, per_task=False):
        scores = torch.tensor(self.scripts[min(self.calls, len(self.scripts) - 1)], dtype=torch.float64)
        self.calls += 1
        return Evaluation(1.0, scores, torch.tensor([1.0], dtype=torch.float64))

    def loss(self, coefficients):
        return 1.0

    def vertex_norms(self):
        return torch.tensor(self.norms, dtype=torch.float64)


def test_fixed_step_reproduces_the_authors_update_rule_by_hand():
    """The authors' code: merged = TA(0.3); each iteration picks per tensor the
    candidate with the most negative cosine (none if all >= 0: a zero task vector,
    i.e. the base) and sets merged += 0.3 * (2 / (t + 2) * 0.1) * (s - merged).

    Two orthogonal unit task vectors tau_1, tau_2 on tensors a and b; the TA merge
    0.3 (tau_1 + tau_2) is the init vertex (row 3). Model coefficients on tau_i:
    a: (0.3, 0.3) -> s=tau_1, gamma 0.03 -> (0.321, 0.291) -> s=tau_2, gamma 0.02 -> (0.31458, 0.30518)
    b: (0.3, 0.3) -> s=base,  gamma 0.03 -> (0.291, 0.291) -> s=tau_1, gamma 0.02 -> (0.30518, 0.28518)
    """
    init = 0.3
    # scores <g, delta> of tau_1, tau_2 and the init merge (0.3 * the sum), per tensor (a, b)
    it0 = [[-1.0, 0.2], [0.5, 0.4]]
    it1 = [[0.5, -0.8], [-1.0, 0.1]]
    scripts = [rows + [[init * (rows[0][l] + rows[1][l]) for l in range(2)]] for rows in (it0, it1)]
    norms = [[1.0, 1.0], [1.0, 1.0], [init * 2**0.5] * 2]
    table = CoefficientTable.at_base(["tau1", "tau2", "init"], ["a", "b"], "toy", "toy")
    table.init = {"name": "init"}
    table.weights[:] = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    table, trace = solve(
        ScriptedOracle(scripts, norms), table, _params(step="fixed", gamma=0.06, lmo_score="cosine", iterations=2), progress=False
    )
    assert [r.gamma for r in trace.iterations] == pytest.approx([0.03, 0.02], abs=1e-15)
    assert [r.choice for r in trace.iterations] == [["tau1", "base"], ["tau2", "tau1"]]
    c = table.coefficients()
    model = c[:2] + c[2:3] * init  # coefficient of each tau in the merged model
    by_hand = torch.tensor([[0.31458, 0.30518], [0.30518, 0.28518]], dtype=torch.float64)
    torch.testing.assert_close(model, by_hand, rtol=0, atol=1e-12)

    # the same numbers from the published update written out in model space
    theta = {"a": torch.tensor([init, init]), "b": torch.tensor([init, init])}
    picks = [{"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 0.0])}, {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([1.0, 0.0])}]
    for t, s in enumerate(picks):
        step = 2 / (t + 2) * 0.1
        for name in theta:
            theta[name] = theta[name] + 0.3 * step * (s[name] - theta[name])
    published = torch.stack([theta["a"], theta["b"]], dim=1).to(torch.float64)
    torch.testing.assert_close(model, published, rtol=0, atol=1e-7)


class TwoTaskOracle(QuadraticOracle):
    """Task 0's scores favour candidate 0, task 1's candidate 1 (their sum favours 0)."""

    def evaluate(self, coefficients, *, per_task=False):
        evaluation = super().evaluate(coefficients, per_task=False)
        task_scores = torch.zeros(2, *evaluation.scores.shape, dtype=torch.float64)
        task_scores[0, 0], task_scores[1, 1] = -3.0, -1.0
        scores = task_scores.sum(0)
        return Evaluation(evaluation.loss, scores, torch.tensor([evaluation.loss / 2] * 2, dtype=torch.float64),
                          task_scores if per_task else None)


def test_top_k_per_task_takes_the_union_of_each_tasks_top_k():
    points = {}
    for per in ("all", "task"):
        oracle = TwoTaskOracle(3, 2, 3, seed=2)
        _, trace = solve(oracle, oracle.table(), _params(variant="soft", top_k=1, top_k_per=per, iterations=1), progress=False)
        points[per] = trace.iterations[0].points
    assert points == {"all": 1, "task": 2}


class _Counting(QuadraticOracle):
    """The toy oracle, counting the calls the solver makes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"gradient": 0, "forward": 0}

    def loss(self, coefficients):
        self.calls["forward"] += 1
        return super().loss(coefficients)

    def evaluate(self, coefficients, *, per_task=False):
        self.calls["gradient"] += 1
        return super().evaluate(coefficients, per_task=per_task)


@pytest.mark.parametrize("settings", [dict(), dict(step="schedule"), dict(variant="soft", top_k=3, inner_steps=4)])
def test_the_trace_counts_the_passes_the_solve_spent(settings):
    """Passes over the calibration set in the trace are the oracle calls made, per
    iteration and in total; a resumed solve adds its own to the earlier ones."""
    oracle = _Counting(5, 3, 4, seed=1)
    params = _params(iterations=4, **settings)
    table, trace = solve(oracle, oracle.table(), params, progress=False)
    assert trace.passes == oracle.calls
    assert sum(r.passes["gradient"] for r in trace.iterations) == oracle.calls["gradient"]
    per_iteration_forward = sum(r.passes["forward"] for r in trace.iterations)
    assert oracle.calls["forward"] - per_iteration_forward in (0, 1)  # the final loss, when no step measured it
    if settings == {}:
        assert all(r.passes == {"gradient": 1, "forward": params.line_search_steps} for r in trace.iterations[1:])
    more = _params(iterations=6, **settings)
    before = dict(trace.passes)
    _, trace = solve(oracle, table, more, trace=trace, progress=False)
    assert trace.passes["gradient"] > before["gradient"] and trace.passes == oracle.calls


def test_epsilon_relative_stops_at_a_fraction_of_the_first_gap():
    oracle = QuadraticOracle(6, 3, 4, seed=0, inside=True)
    _, full = solve(oracle, oracle.table(), _params(iterations=200, line_search_steps=20), progress=False)
    first = full.iterations[0].gap
    crossing = next(r.iteration for r in full.iterations if r.gap <= 0.1 * first)
    _, trace = solve(oracle, oracle.table(), _params(iterations=200, line_search_steps=20, epsilon_relative=0.1),
                     progress=False)
    assert len(trace.iterations) == crossing + 1 and "epsilon_relative" in trace.stopped
    assert all(r.gap > 0.1 * first for r in trace.iterations[:-1])
    assert trace.iterations[-1].gamma == 0.0 and trace.final_loss == trace.iterations[-1].loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_quadratic_step_reaches_the_optimum_on_a_fraction_of_the_forward_passes(seed):
    """On a quadratic loss the parabola is exact: one forward pass at gamma = 1, one at its
    minimiser, against the golden-section search's many."""
    runs = {}
    for step in ("line_search", "quadratic"):
        oracle = QuadraticOracle(6, 3, 4, seed, inside=True)
        _, trace = solve(oracle, oracle.table(), _params(iterations=60, step=step, line_search_steps=20),
                         progress=False)
        runs[step] = trace
    assert runs["quadratic"].final_loss <= runs["line_search"].final_loss * 1.05 + 1e-9
    forwards = [r.passes["forward"] for r in runs["quadratic"].iterations]
    assert max(forwards) <= 2
    assert runs["quadratic"].passes["forward"] < runs["line_search"].passes["forward"] / 5


def _excess_at(trace, optimum: float, units: float) -> float:
    """How far above the optimum a solve was once it had spent ``units`` forward-pass
    equivalents (a gradient pass counting 3)."""
    spent, excess = 0.0, math.inf
    for record in trace.iterations:
        spent += 3 * record.passes.get("gradient", 0) + record.passes.get("forward", 0)
        if spent <= units and record.loss_after is not None:
            excess = record.loss_after - optimum
    return excess


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_adaptive_step_halves_the_forward_passes_and_matches_the_quadratic_at_equal_spend(seed):
    """Along the box's projection arc (480 coefficients) the quadratic rule spends
    about 3 forward passes an iteration; the adaptive rule about 1.3, and at the
    quadratic's total spend it is about as close to the optimum (measured: 0.88, 1.05
    and 0.86 times the quadratic's excess; 1.3-1.5 forward passes an iteration)."""
    optimum = QuadraticOracle(12, 40, 8, seed).optimum("box")
    runs = {}
    for step, iterations in (("quadratic", 30), ("adaptive", 60)):
        oracle = QuadraticOracle(12, 40, 8, seed)
        _, trace = solve(oracle, oracle.table("box"),
                         _params(iterations=iterations, step=step, constraint="box", direction="projected_pairwise"),
                         progress=False)
        runs[step] = trace
    quadratic, adaptive = runs["quadratic"], runs["adaptive"]
    per_iteration = {k: t.passes["forward"] / len(t.iterations) for k, t in runs.items()}
    assert per_iteration["adaptive"] <= 0.6 * per_iteration["quadratic"]
    spend = 3 * quadratic.passes["gradient"] + quadratic.passes["forward"]
    assert _excess_at(adaptive, optimum, spend) <= 1.25 * _excess_at(quadratic, optimum, spend)
    assert all(r.curvature is not None and r.curvature > 0 for r in adaptive.iterations if r.gamma)


@pytest.mark.parametrize("constraint", [("hull", None), ("box", None), ("scaled_hull", 2.0), ("capped_box", 2.0)],
                         ids=lambda c: c[0])
@pytest.mark.parametrize("seed", [3, 4])
def test_away_and_pairwise_steps_close_the_gap_where_plain_fw_zig_zags(constraint, seed):
    """The optimum lies on a face (the target is outside the set): plain FW's iterates
    zig-zag towards it and its gap is still above a millionth of the first after 300
    iterations; away and pairwise steps, on the same exact (quadratic) step rule, take
    the wrongly picked vertices back and reach the QP's optimum."""
    kind, radius = constraint
    optimum = QuadraticOracle(5, 2, 6, seed=seed).optimum(kind, radius or 1.0)
    reached = {}
    for direction in ("frank_wolfe", "away", "pairwise"):
        oracle = QuadraticOracle(5, 2, 6, seed=seed)
        _, trace = solve(oracle, oracle.table(kind, radius),
                         _params(iterations=300, step="quadratic", direction=direction), progress=False)
        first = trace.iterations[0].gap
        reached[direction] = next((r.iteration for r in trace.iterations if r.gap <= 1e-6 * first), None)
        if direction != "frank_wolfe":
            assert abs(trace.final_loss - optimum) < 1e-8
            assert any(r.direction == direction for r in trace.iterations)
    assert reached["frank_wolfe"] is None
    assert reached["away"] is not None and reached["pairwise"] is not None
    assert max(reached["away"], reached["pairwise"]) < 250


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projected_pairwise_steps_do_not_stall_in_a_box_of_many_coefficients(seed):
    """480 box coefficients (12 candidates, 40 tensors): after a few iterations some
    coefficient always sits near its bound, so the straight pairwise step is cut to a
    few thousandths and, at 30 iterations, ends further from the QP's optimum than
    plain FW. Along the box's projection the step is not cut: it ends several times
    closer than either, every iterate in the box."""
    optimum = QuadraticOracle(12, 40, 8, seed).optimum("box")
    excess, steps = {}, {}
    for direction in ("frank_wolfe", "pairwise", "projected_pairwise"):  # measured: 9 / 16-33 / 0.8-1.7
        oracle = QuadraticOracle(12, 40, 8, seed)
        seen = []
        _, trace = solve(oracle, oracle.table("box"),
                         _params(iterations=30, step="quadratic", constraint="box", direction=direction),
                         progress=False, on_iteration=lambda table, record: seen.append(table.weights.clone()))
        for weights in seen:
            oracle.table("box").constraint_set.check(weights)
        assert trace.final_loss >= optimum - 1e-9
        excess[direction] = trace.final_loss - optimum
        later = sorted(r.gamma for r in trace.iterations[5:])
        steps[direction] = later[len(later) // 2]
    assert steps["pairwise"] < 0.01  # the median step after the first five: cut at the nearest bound
    assert excess["pairwise"] > excess["frank_wolfe"]
    assert excess["projected_pairwise"] < excess["frank_wolfe"] / 3


def test_a_killed_adaptive_solve_resumes_with_its_curvature_to_the_same_bits(tmp_path):
    """The adaptive step's estimate lives in the trace (each iteration's record), so a
    solve resumed from its checkpoint takes the steps the uninterrupted one took."""
    from mergekit_fw.solve.solver import load_checkpoint

    settings = _params(iterations=20, step="adaptive", constraint="box", direction="projected_pairwise",
                       epsilon_relative=0.0)
    oracle = QuadraticOracle(6, 8, 5, seed=9)
    whole, whole_trace = solve(oracle, oracle.table("box"), settings, progress=False)

    class Killed(Exception):
        pass

    def kill(table, record):
        if record.iteration == 11:
            raise Killed

    path = tmp_path / "checkpoint.json"
    oracle = QuadraticOracle(6, 8, 5, seed=9)
    with pytest.raises(Killed):
        solve(oracle, oracle.table("box"), settings, checkpoint=path, progress=False, on_iteration=kill)
    saved = load_checkpoint(path)
    assert saved is not None and len(saved.trace.iterations) == 11
    assert saved.trace.iterations[-1].curvature is not None
    oracle = QuadraticOracle(6, 8, 5, seed=9)
    resumed, trace = solve(oracle, saved.table, settings, checkpoint=path, trace=saved.trace, progress=False)
    assert torch.equal(resumed.weights, whole.weights)
    assert [r.passes for r in trace.iterations] == [r.passes for r in whole_trace.iterations]


PENALISED = {
    "paper": lambda **s: _params(iterations=300, line_search_steps=40, **s),
    # the defaults (projected pairwise, adaptive step), run past the relative-gap stop
    "defaults": lambda **s: FrankWolfeParameters(calibration="unused.jsonl", iterations=300, epsilon_relative=0.0,
                                                 screen_per_task=0, **s),
}


@pytest.mark.parametrize("settings", list(PENALISED))
@pytest.mark.parametrize("constraint", ["box", "hull"])
def test_hard_fw_with_a_weight_penalty_reaches_the_penalised_optimum(constraint, settings):
    """The cost per unit of weight, resolved on the first gradient, moves hard FW to the
    optimum of the loss plus the cost (scipy's QP on the same set), with less weight than
    without it; the trace's losses stay the loss alone, and no step raises the objective."""
    oracle = QuadraticOracle(5, 2, 6, seed=3)
    params = PENALISED[settings]
    free, _ = solve(oracle, oracle.table(constraint), params(), progress=False)
    iterates: list[tuple[torch.Tensor, torch.Tensor]] = []

    def check(table, record) -> None:
        table.constraint_set.check(table.weights)
        iterates.append((table.weights.clone(), table.coefficients().clone()))

    table, trace = solve(oracle, oracle.table(constraint), params(weight_penalty=0.5), progress=False,
                         on_iteration=check)
    first = oracle.evaluate(oracle.table(constraint).coefficients()).scores
    assert trace.weight_penalty == pytest.approx(0.5 * float(first.abs().mean()), rel=1e-12)
    objectives = [oracle.loss(c) + trace.weight_penalty * float(w[1:].sum()) for w, c in iterates]
    assert trace.final_loss == pytest.approx(oracle.loss(table.coefficients()), rel=1e-9)
    objective = trace.final_loss + trace.weight_penalty * float(table.weights[1:].sum())
    best = oracle.optimum(constraint, per_unit=trace.weight_penalty)
    assert best - 1e-9 <= objective <= best + 2e-3 * max(1.0, best)
    assert all(b <= a + 1e-9 for a, b in zip(objectives, objectives[1:]))
    assert float(table.weights[1:].sum()) < float(free.weights[1:].sum()) - 0.05
    # the gap is the penalised objective's: the last one bounds the distance to its optimum
    assert objective <= best + trace.iterations[-1].gap + 1e-9


def test_a_resumed_hard_fw_solve_with_a_weight_penalty_keeps_its_cost():
    """The cost is resolved once, at the first gradient; a solve continued from its trace
    reads it back and takes the uninterrupted solve's steps, bit for bit."""
    oracle = QuadraticOracle(5, 2, 6, seed=4)
    params = FrankWolfeParameters(calibration="unused.jsonl", iterations=12, epsilon_relative=0.0, weight_penalty=1.0)
    whole, whole_trace = solve(oracle, oracle.table("box"), params, progress=False)
    part, part_trace = solve(oracle, oracle.table("box"), params.model_copy(update={"iterations": 5}), progress=False)
    part_trace.stopped = None
    rest, rest_trace = solve(oracle, part, params, trace=part_trace, progress=False)
    assert rest_trace.weight_penalty == whole_trace.weight_penalty
    assert torch.equal(rest.weights, whole.weights)
