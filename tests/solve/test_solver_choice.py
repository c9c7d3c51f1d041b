"""solver: auto: which solver the rule picks, that a setting only one solver reads names that
solver (by its value, as mergekit's kernel sees it), and that a solve it picks is the same
cached solve as one that named the same solver."""

from __future__ import annotations

import json

import pytest

from mergekit_fw.config import ConfigError, FrankWolfeParameters, from_method_kwargs, parse_parameters
from mergekit_fw.integration.stock import solve
from mergekit_fw.output.card import frank_wolfe_section
from mergekit_fw.solve.solver_choice import SolverChoice, choose_solver, resolve_solver
from tests.paths import mergekit_yaml
from tests.solve.helpers import rank_rows_configs


def _params(**settings) -> FrankWolfeParameters:
    return FrankWolfeParameters(calibration="calib.jsonl", **settings)


def test_auto_is_the_default_and_follows_the_granularity():
    assert _params().solver == "auto"
    per_component = choose_solver(_params(granularity="rank_component"))
    assert per_component.solver == "projected_gradient" and "rank component" in per_component.reason
    per_candidate = choose_solver(_params(granularity="candidate"))
    assert per_candidate.solver == "frank_wolfe" and "granularity candidate" in per_candidate.reason


@pytest.mark.parametrize(
    "settings, solver, named",
    [
        ({"iterations": 10}, "frank_wolfe", "iterations"),
        ({"step": "quadratic"}, "frank_wolfe", "step"),
        # soft FW steps along the paper's direction (config's rule): both away from their defaults
        ({"variant": "soft"}, "frank_wolfe", "variant, direction"),
        ({"epsilon_relative": 0.0, "lmo_score": "cosine"}, "frank_wolfe", "lmo_score, epsilon_relative"),
        ({"gradient_steps": 50}, "projected_gradient", "gradient_steps"),
        ({"learning_rate": 0.05}, "projected_gradient", "learning_rate"),
    ],
)
def test_a_setting_only_one_solver_reads_names_that_solver(settings, solver, named):
    for granularity in ("candidate", "rank_component"):
        choice = choose_solver(_params(granularity=granularity, **settings))
        assert choice == SolverChoice(solver, f"{named} set, which only {solver} reads")


def test_values_name_a_solver_not_typed_fields():
    """A setting written at its default, or one both solvers read, names neither: mergekit's
    kernel sees every default filled in, so typing one must not change the choice."""
    for settings in ({"iterations": 30}, {"gradient_steps": 400}, {"weight_penalty": 0.3}, {"step": "adaptive"}):
        params = _params(granularity="rank_component", **settings)
        assert choose_solver(params).solver == "projected_gradient", settings
        filled = {name: getattr(params, name) for name in FrankWolfeParameters.model_fields}
        assert choose_solver(from_method_kwargs(filled)) == choose_solver(params)


def test_settings_of_both_solvers_under_auto_are_refused_naming_them():
    with pytest.raises(ConfigError) as error:
        parse_parameters({"calibration": "c.jsonl", "iterations": 10, "learning_rate": 0.05}, source="fw.yml")
    message = str(error.value)
    assert "iterations (frank_wolfe)" in message and "learning_rate (projected_gradient)" in message
    assert "name the solver" in message
    # each alone, or with its solver named, is fine
    parse_parameters({"calibration": "c.jsonl", "iterations": 10})
    parse_parameters({"calibration": "c.jsonl", "solver": "projected_gradient", "learning_rate": 0.05})


def test_a_resolved_auto_is_the_named_solver_in_the_fingerprint():
    for granularity, solver in (("rank_component", "projected_gradient"), ("candidate", "frank_wolfe")):
        resolved, choice = resolve_solver(_params(granularity=granularity))
        assert choice is not None and resolved.solver == solver
        named = _params(granularity=granularity, solver=solver)
        assert resolved.fingerprint_fields() == named.fingerprint_fields()
        assert resolve_solver(named) == (named, None)
    # resolved to Frank-Wolfe, the fingerprint is the one runs had before auto existed
    assert "solver" not in resolve_solver(_params())[0].fingerprint_fields()


@pytest.mark.slow
def test_an_auto_solve_is_the_named_solve_and_the_card_says_why(random_pool, tmp_path):
    """Through the real entry point at the defaults: enough rows on each task give one
    coefficient per rank component and projected gradient, read back from the cache by a run
    that names that solver, with the reason in the table and the card; mergekit-yaml makes
    the same choice."""
    write, config = rank_rows_configs(random_pool, tmp_path, batch_size=64)
    auto = solve(*config("auto.yml"), progress=False)
    assert auto.table.granularity == "rank_component" and not auto.reused
    assert len(auto.trace.iterations) == 400 and {r.direction for r in auto.trace.iterations} == {"projected_gradient"}
    assert "rank component" in auto.table.meta["solver_auto"]
    card = frank_wolfe_section(auto.table, auto.trace.to_json())
    assert "**Solver** chosen by `solver: auto`: projected_gradient (one coefficient per LoRA rank component" in card
    assert "`solver: projected_gradient`" in card and "`gradient_steps: 400`" in card and "`iterations:" not in card
    named = solve(*config("named.yml", solver="projected_gradient"), progress=False)
    assert named.reused and named.table.fingerprint == auto.table.fingerprint
    assert "solver_auto" not in named.table.meta
    assert "chosen by `solver: auto`" not in frank_wolfe_section(named.table, named.trace.to_json())
    # a Frank-Wolfe setting: Frank-Wolfe, per rank component all the same
    fw = solve(*config("fw.yml", iterations=2), progress=False)
    assert fw.table.granularity == "rank_component" and len(fw.trace.iterations) <= 2
    assert fw.table.meta["solver_auto"] == "iterations set, which only frank_wolfe reads"
    # mergekit-yaml, where mergekit hands the kernel every default: the same choice and solve
    mergekit_yaml(write("yaml.yml"), tmp_path / "yaml")
    written = json.loads((tmp_path / "yaml" / "fw_table.json").read_text())
    assert written["fingerprint"] == auto.table.fingerprint
    assert "chosen by `solver: auto`: projected_gradient" in (tmp_path / "yaml" / "README.md").read_text()
