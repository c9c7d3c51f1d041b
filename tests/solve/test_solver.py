import torch

from mergekit_fw.config import FrankWolfeParameters
from mergekit_fw.solve.simplex import check_feasible
from mergekit_fw.solve.solver import solve
from mergekit_fw.solve.steps import golden_section
from mergekit_fw.solve.table import CoefficientTable
from tests.oracle.helpers import make_oracle, pool_spec


def _params(random_pool, **overrides) -> FrankWolfeParameters:
    return FrankWolfeParameters(calibration=str(random_pool["calibration"]), **overrides)


def _run(random_pool, **overrides):
    oracle, pool, _ = make_oracle(random_pool, pool_spec(random_pool))
    table = CoefficientTable.at_base(pool.names, oracle.tensors, "test", str(random_pool["base"]))
    seen = []
    table, trace = solve(
        oracle, table, _params(random_pool, **overrides), progress=False,
        on_iteration=lambda t, record: seen.append((t.weights.clone(), record)),
    )
    return oracle, table, trace, seen


def test_every_iterate_is_feasible_gap_nonnegative_loss_nonincreasing(random_pool):
    oracle, table, trace, seen = _run(random_pool, iterations=5)
    assert len(seen) == len(trace.iterations) >= 2
    losses = []
    for weights, record in seen:
        check_feasible(weights)
        assert record.gap >= 0
        assert record.loss_after <= record.loss + 1e-12
        losses.append(record.loss)
        # the recorded loss after the step is the true loss at the new iterate
    for (weights, record), (_, following) in zip(seen, seen[1:]):
        assert abs(following.loss - record.loss_after) < 1e-9
    assert trace.final_loss < trace.initial_loss
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
    torch.testing.assert_close(torch.tensor(oracle.loss(table.coefficients())), torch.tensor(trace.final_loss))
    assert trace.stopped


def test_schedule_step_uses_two_over_t_plus_two(random_pool):
    _, _, trace, seen = _run(random_pool, iterations=3, step="schedule")
    assert [r.gamma for r in trace.iterations] == [1.0, 2 / 3, 0.5]
    for weights, _ in seen:
        check_feasible(weights)


def test_epsilon_stops_on_the_gap(random_pool):
    _, _, trace, _ = _run(random_pool, iterations=5, epsilon=1e9)
    assert len(trace.iterations) == 1 and "epsilon" in trace.stopped


def test_golden_section_finds_the_minimum_and_never_increases():
    gamma, value, seen = golden_section(lambda g: (g - 0.3) ** 2, f0=0.09, evaluations=20)
    assert abs(gamma - 0.3) < 1e-3 and value <= 0.09
    gamma, value, _ = golden_section(lambda g: 1.0 + g, f0=1.0, evaluations=8)
    assert gamma == 0.0 and value == 1.0


def test_trace_keeps_the_starting_points_scores_per_task(random_pool):
    """The report's LMO figure: per task and candidate, <grad_task, delta> summed over
    tensors at the starting point; the per-task parts add up to the LMO's own scores."""
    oracle, table, trace, seen = _run(random_pool, iterations=2)
    start = CoefficientTable.at_base(table.candidates, oracle.tensors, "test", str(random_pool["base"]))
    evaluation = oracle.evaluate(start.coefficients(), per_task=True)
    expected = evaluation.task_scores.sum(dim=2)
    got = torch.tensor(trace.task_scores, dtype=torch.float64)
    assert got.shape == (2, len(table.candidates))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.sum(0), evaluation.scores.sum(1), rtol=1e-6, atol=1e-10)
    assert float(got.abs().min()) > 0
