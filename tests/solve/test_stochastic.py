"""The stochastic solvers on the batched toy: every iterate in the set, the set's
optimum reached, never worse than the start, passes counted, and a killed solve
resumed to the same bits."""

from __future__ import annotations

import pytest
import torch

from mergekit_fw.config import FrankWolfeParameters
from mergekit_fw.solve.solver import load_checkpoint
from mergekit_fw.solve.stochastic import solve_stochastic, step_batches
from tests.toy import BatchedQuadratic

SETS = [("hull", None), ("box", None), ("scaled_hull", 2.0), ("capped_box", 1.5)]
SOLVERS = ["projected_gradient", "stochastic_frank_wolfe"]


def params(solver: str = "projected_gradient", **given) -> FrankWolfeParameters:
    return FrankWolfeParameters(calibration="unused.jsonl", solver=solver, **{"screen_per_task": 0, **given})


def test_step_batches_cycle_through_each_tasks_batches():
    toy = BatchedQuadratic(2, 1, 3, seed=0, batches_per_task=(3, 2))
    picked = [[(b.task, b.index) for b in step_batches(toy.batches, t)] for t in range(4)]
    assert picked == [[(0, 0), (1, 0)], [(0, 1), (1, 1)], [(0, 2), (1, 0)], [(0, 0), (1, 1)]]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("constraint,radius", SETS)
def test_every_iterate_is_feasible_and_the_sets_optimum_is_reached(constraint, radius, solver):
    toy = BatchedQuadratic(3, 2, 5, seed=3, batches_per_task=(1, 1))  # one batch a task: exact gradients
    table = toy.table(constraint, radius)
    checked = []
    table, trace = solve_stochastic(
        toy, table, params(solver, gradient_steps=3000), progress=False,
        on_iteration=lambda t, r: (t.constraint_set.check(t.weights), checked.append(r.iteration)),
    )
    assert checked == list(range(3000))
    best = toy.optimum_loss(constraint, radius or 1.0)
    assert trace.final_loss == pytest.approx(toy.loss(table.coefficients()), rel=1e-12)
    assert best - 1e-9 <= trace.final_loss <= best + 1e-3 * max(1.0, abs(best))
    assert trace.iterations[-1].gap < 1e-2 * trace.iterations[0].gap


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("constraint", ["box", "hull"])
def test_a_weight_penalty_reaches_the_penalised_optimum_with_less_weight(constraint, solver):
    toy = BatchedQuadratic(4, 3, 5, seed=11, batches_per_task=(1, 1))  # exact gradients
    free, _ = solve_stochastic(toy, toy.table(constraint), params(solver, gradient_steps=3000), progress=False)
    table, trace = solve_stochastic(
        toy, toy.table(constraint), params(solver, gradient_steps=3000, weight_penalty=0.5), progress=False,
        on_iteration=lambda t, r: t.constraint_set.check(t.weights),
    )
    # resolved from the first gradient, at the base: half its mean absolute entry
    first = toy.evaluate(toy.table(constraint).coefficients()).scores
    assert trace.weight_penalty == pytest.approx(0.5 * float(first.abs().mean()), rel=1e-12)
    objective = trace.final_loss + trace.weight_penalty * float(table.weights[1:].sum())
    best = toy.optimum_loss(constraint, per_unit=trace.weight_penalty)
    assert best - 1e-9 <= objective <= best + 1e-3 * max(1.0, abs(best))
    # the unpenalised optimum is not the penalised one: the penalty changed the answer
    assert float(table.weights[1:].sum()) < float(free.weights[1:].sum()) - 0.05


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("constraint,radius", SETS)
def test_stochastic_steps_go_down_and_count_their_passes(constraint, radius, solver):
    toy = BatchedQuadratic(3, 2, 5, seed=4, batches_per_task=(4, 4))
    table, trace = solve_stochastic(toy, toy.table(constraint, radius), params(solver, gradient_steps=400),
                                    progress=False)
    assert trace.final_loss < trace.initial_loss
    # 400 steps of 1 batch in 4 per task: 100 gradient passes; the start's and the end's loss: 2 forward
    assert trace.passes["gradient"] == pytest.approx(100.0) and trace.passes["forward"] == pytest.approx(2.0)


def test_a_step_that_ends_worse_keeps_the_start():
    toy = BatchedQuadratic(3, 2, 5, seed=5, batches_per_task=(1,))
    # start at the box's optimum, then one huge step must leave it and end worse
    solved, _ = solve_stochastic(toy, toy.table("box"), params(gradient_steps=3000), progress=False)
    start = solved.weights.clone()
    table, trace = solve_stochastic(toy, solved, params(gradient_steps=1, learning_rate=5.0), progress=False)
    assert torch.equal(table.weights, start)
    assert "kept the start" in trace.stopped and trace.final_loss == trace.initial_loss


@pytest.mark.parametrize("solver", SOLVERS)
def test_with_a_weight_penalty_the_start_is_judged_on_the_penalised_objective(solver):
    toy = BatchedQuadratic(3, 2, 5, seed=5, batches_per_task=(1,))
    # from the loss's own optimum in the box, a cost on weight can only raise the loss, while it
    # lowers the loss plus the cost: the solve must keep its end, not fall back to the start
    solved, _ = solve_stochastic(toy, toy.table("box"), params(gradient_steps=3000), progress=False)
    start = solved.weights.clone()
    table, trace = solve_stochastic(toy, solved, params(solver, gradient_steps=500, weight_penalty=2.0), progress=False)
    assert trace.final_loss > trace.initial_loss and "kept the start" not in trace.stopped
    cost = trace.weight_penalty
    assert trace.final_loss + cost * float(table.weights[1:].sum()) < trace.initial_loss + cost * float(start[1:].sum())


def test_task_granularity_keeps_one_coefficient_per_candidate():
    toy = BatchedQuadratic(3, 4, 5, seed=6, batches_per_task=(2, 2))
    table, _ = solve_stochastic(
        toy, toy.table("box"), params(gradient_steps=50, lmo="task", constraint="box"), progress=False,
        on_iteration=lambda t, r: None if bool((t.weights == t.weights[:, :1]).all()) else pytest.fail("columns differ"),
    )
    assert float(table.weights[1:].abs().sum()) > 0


class Killed(Exception):
    pass


@pytest.mark.parametrize("penalty", [0.0, 0.5])
@pytest.mark.parametrize("solver", SOLVERS)
def test_a_killed_solve_resumes_to_the_same_bits(tmp_path, solver, penalty):
    settings = params(solver, gradient_steps=45, constraint="box", weight_penalty=penalty)
    whole, whole_trace = solve_stochastic(
        BatchedQuadratic(3, 2, 5, seed=8, batches_per_task=(3, 2)), BatchedQuadratic(3, 2, 5, seed=8).table("box"),
        settings, progress=False)

    def kill(table, record):
        if record.iteration == 33:
            raise Killed

    path = tmp_path / "checkpoint.json"
    toy = BatchedQuadratic(3, 2, 5, seed=8, batches_per_task=(3, 2))
    with pytest.raises(Killed):
        solve_stochastic(toy, toy.table("box"), settings, checkpoint=path, progress=False, on_iteration=kill)
    saved = load_checkpoint(path)
    assert saved is not None and len(saved.trace.iterations) == 30 and saved.extra["rule"]
    toy = BatchedQuadratic(3, 2, 5, seed=8, batches_per_task=(3, 2))
    resumed, trace = solve_stochastic(toy, saved.table, settings, checkpoint=path, trace=saved.trace, state=saved.extra,
                                     progress=False)
    assert torch.equal(resumed.weights, whole.weights)
    assert trace.final_loss == whole_trace.final_loss and len(trace.iterations) == 45


@pytest.mark.slow
@pytest.mark.parametrize("solver,settings,named", [
    ("projected_gradient", {"learning_rate": 0.05}, "projected gradient descent"),
    # with a weight cost, so that a setting only these solvers read goes through mergekit-yaml too
    ("stochastic_frank_wolfe", {"weight_penalty": 0.3}, "stochastic Frank-Wolfe with momentum"),
])
def test_stochastic_solvers_run_in_all_three_paths(random_pool, tmp_path, solver, settings, named):
    """Each stochastic solver through ``mergekit-fw run`` (and stochastic Frank-Wolfe
    through ``mergekit-yaml`` and the stock-mergekit replay too: the same tensors), a box
    table, the steps in the trace and the solver named on the card."""
    import json

    from tests.paths import assert_same_tensors, mergekit_fw_here, mergekit_yaml, replay, tensors, write_config

    base = str(random_pool["base"])
    models = [{"model": f"{base}+{a}"} for a in random_pool["adapters"]] + [{"model": str(random_pool["dense"][0])}]
    fw = write_config(tmp_path / "fw.yml", {
        "merge_method": "frank_wolfe", "base_model": base, "models": models, "dtype": "float32",
        "parameters": {"calibration": str(random_pool["calibration"]), "solver": solver,
                       "gradient_steps": 12, "constraint": "box", **settings},
    })
    mergekit_fw_here(fw, tmp_path / "fast")
    if solver == "stochastic_frank_wolfe":  # the other paths share its plumbing: once is enough (CI time)
        mergekit_yaml(fw, tmp_path / "yaml")
        replay(tmp_path / "fast", tmp_path / "replay", tmp_path / "lora_cache")
        assert_same_tensors(tensors(tmp_path / "fast"), tensors(tmp_path / "yaml"), tensors(tmp_path / "replay"))
    trace = json.loads((tmp_path / "fast" / "fw_trace.json").read_text())
    assert [it["direction"] for it in trace["iterations"]] == [solver] * 12
    assert trace["final_loss"] <= trace["initial_loss"] and trace["passes"]["gradient"] > 0
    assert (trace["weight_penalty"] is not None and trace["weight_penalty"] > 0) == ("weight_penalty" in settings)
    table = json.loads((tmp_path / "fast" / "fw_table.json").read_text())
    coefficients = torch.tensor(list(table["coefficients"].values()), dtype=torch.float64)
    assert table["constraint"] == "box" and 0.0 <= float(coefficients.min()) and float(coefficients.max()) <= 1.0
    assert float(coefficients.max()) > 0.0  # it moved off the base
    card = (tmp_path / "fast" / "README.md").read_text()
    assert named in card and "`gradient_steps: 12`" in card and "`step:" not in card
    assert ("`weight_penalty: 0.3`" in card) == ("weight_penalty" in settings)


def test_shared_coefficients_from_a_start_that_varies_by_tensor_is_a_config_error():
    from mergekit_fw.config import ConfigError

    toy = BatchedQuadratic(3, 2, 5, seed=9, batches_per_task=(1,))
    table = toy.table("box")
    table.weights[1, 0], table.weights[0, 0] = 0.5, 0.5  # one candidate at 0.5 on the first tensor only
    with pytest.raises(ConfigError, match="parameters.lmo"):
        solve_stochastic(toy, table, params(lmo="task", gradient_steps=2), progress=False)
