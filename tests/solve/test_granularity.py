"""granularity: auto: which granularity the rule picks, and that a solve it picks is the
same cached solve as one that named the same granularity."""

from __future__ import annotations

import json

import pytest

from mergekit_fw.config import FrankWolfeParameters
from mergekit_fw.integration.stock import solve
from mergekit_fw.output.card import frank_wolfe_section
from mergekit_fw.pool.pool import open_pool
from mergekit_fw.solve.granularity import RANK_ROWS, GranularityChoice, choose_granularity, resolve_granularity
from tests.oracle.helpers import pool_spec
from tests.paths import mergekit_yaml
from tests.solve.helpers import rank_rows_configs

ENOUGH = {"reverse": RANK_ROWS, "sort": RANK_ROWS + 7}


def _params(**settings) -> FrankWolfeParameters:
    return FrankWolfeParameters(calibration="calib.jsonl", **settings)


def _fingerprint(params: FrankWolfeParameters) -> dict:
    """The fingerprint of the solve with ``params`` under Frank-Wolfe (solver auto has none)."""
    return params.model_copy(update={"solver": "frank_wolfe"}).fingerprint_fields()


@pytest.fixture(scope="module")
def loras(random_pool):
    return open_pool(pool_spec(random_pool, kinds=("lora",)))


def test_auto_is_the_default_and_splits_loras_with_enough_rows_on_every_task(loras):
    params = _params()
    assert params.granularity == "auto"
    resolved, choice = resolve_granularity(params, loras, ENOUGH)
    assert resolved.granularity == choice.granularity == "rank_component"
    assert _fingerprint(resolved) == _fingerprint(_params(granularity="rank_component"))
    # one task under the threshold keeps whole candidates, naming that task and its rows
    few = {**ENOUGH, "sort": RANK_ROWS - 1}
    resolved, choice = resolve_granularity(params, loras, few)
    assert resolved.granularity == "candidate" and f"'sort' has {RANK_ROWS - 1} rows" in choice.reason
    # resolved to candidate, the fingerprint is the one runs had before auto existed
    assert _fingerprint(resolved) == _fingerprint(_params(granularity="candidate"))
    assert "granularity" not in _fingerprint(resolved)


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"constraint": "hull"}, "constraint hull"),
        ({"constraint": "scaled_hull"}, "constraint scaled_hull"),
        ({"merge_fn": "ties"}, "merge_fn ties"),
        ({"lmo": "task"}, "lmo task"),
        ({"variant": "soft"}, "variant soft"),
        ({"objective": "entropy"}, "objective entropy"),
        ({"init": "ta.yml"}, "init is a mergekit merge"),
    ],
)
def test_auto_keeps_whole_candidates_outside_the_measured_setting(loras, settings, named):
    choice = choose_granularity(_params(**settings), loras, ENOUGH)
    assert choice.granularity == "candidate" and named in choice.reason


def test_auto_keeps_whole_candidates_without_a_lora_and_follows_an_init_table(random_pool, loras):
    dense = open_pool(pool_spec(random_pool, kinds=("dense",)))
    assert choose_granularity(_params(), dense, ENOUGH) == GranularityChoice("candidate", "no LoRA adapter in the pool")
    for solved in ("candidate", "rank_component"):
        assert choose_granularity(_params(), loras, {"t": 1}, init_granularity=solved).granularity == solved
    # the gradient solvers are in the measured setting too
    for solver in ("projected_gradient", "stochastic_frank_wolfe"):
        assert choose_granularity(_params(solver=solver), loras, ENOUGH).granularity == "rank_component"
    # a granularity the config names is kept as it is
    named = _params(granularity="candidate")
    assert resolve_granularity(named, loras, ENOUGH) == (named, None)


def test_an_auto_solve_is_the_named_solve_and_the_card_says_why(random_pool, tmp_path):
    """Through the real entry point: enough rows on each task give a table per rank
    component, read back from the cache by a run that names rank_component, and the
    table carries the reason the card prints."""
    write, config = rank_rows_configs(random_pool, tmp_path, iterations=1)
    auto = solve(*config("auto.yml"), progress=False)
    assert auto.table.granularity == "rank_component" and not auto.reused
    assert "at least 50 calibration rows" in auto.table.meta["granularity_auto"]
    card = frank_wolfe_section(auto.table, auto.trace.to_json())
    assert "**Granularity** chosen by `granularity: auto`: rank_component (LoRA adapters in the pool" in card
    assert "`granularity: rank_component`" in card and "No replay config" in card
    named = solve(*config("named.yml", granularity="rank_component"), progress=False)
    assert named.reused and named.table.fingerprint == auto.table.fingerprint
    assert "granularity_auto" not in named.table.meta
    assert "chosen by `granularity: auto`" not in frank_wolfe_section(named.table, named.trace.to_json())
    few = solve(*config("few.yml", samples_per_task=RANK_ROWS - 1), progress=False)
    assert few.table.granularity == "candidate" and "(< 50" in few.table.meta["granularity_auto"]
    # mergekit-yaml, where mergekit hands the kernel every default: the same choice, the same
    # cached solve, and the card and the missing replay say so
    mergekit_yaml(write("yaml.yml"), tmp_path / "yaml")
    written = json.loads((tmp_path / "yaml" / "fw_table.json").read_text())
    assert written["fingerprint"] == auto.table.fingerprint and written["meta"]["granularity"] == "rank_component"
    assert "chosen by `granularity: auto`" in (tmp_path / "yaml" / "README.md").read_text()
    assert not (tmp_path / "yaml" / "fw_mergekit.yml").exists()
