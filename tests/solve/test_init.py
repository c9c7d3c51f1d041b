"""Starting points: another merge (run by mergekit, added as a vertex) or a previous table."""

import json

import pytest
import torch
import yaml

from mergekit_fw.config import ConfigError
from mergekit_fw.integration.configs import load_merge_config, pool_and_parameters
from mergekit_fw.integration.stock import solve
from tests.paths import (
    assert_same_tensors,
    mergekit_fw_here,
    mergekit_yaml,
    replay,
    tensors,
    write_config,
)


def _models(random_pool):
    return [{"model": f"{random_pool['base']}+{a}"} for a in random_pool["adapters"]] + [{"model": str(random_pool["dense"][0])}]


def _ta(random_pool, tmp_path, **extra):
    return write_config(tmp_path / "ta.yml", {
        "merge_method": "task_arithmetic", "base_model": str(random_pool["base"]),
        "models": [{**m, "parameters": {"weight": 0.3}} for m in _models(random_pool)], "dtype": "float32", **extra,
    })


def _fw(random_pool, tmp_path, name="fw.yml", **parameters):
    return write_config(tmp_path / name, {
        "merge_method": "frank_wolfe", "base_model": str(random_pool["base"]), "models": _models(random_pool),
        "parameters": {"calibration": str(random_pool["calibration"]), **parameters}, "dtype": "float32",
    })


@pytest.mark.slow
# the scaled hull (radius 2) only: the hull is its radius-1 case, and each run costs
# three commands (CI time)
@pytest.mark.parametrize("constraint", [{"constraint": "scaled_hull", "radius": 2.0}], ids=["scaled_hull"])
def test_ta_init_is_exactly_mergekits_merge_at_iteration_zero(random_pool, tmp_path, constraint):
    ta = _ta(random_pool, tmp_path)
    fw = _fw(random_pool, tmp_path, init=str(ta), epsilon=1e9, iterations=1, **constraint)  # stops before any step
    mergekit_yaml(ta, tmp_path / "ta_out", tmp_path / "lora_cache")
    mergekit_fw_here(fw, tmp_path / "fast")
    mergekit_yaml(fw, tmp_path / "yaml")
    expected = tensors(tmp_path / "ta_out")
    for out in ("fast", "yaml"):
        got = tensors(tmp_path / out)
        assert set(got) == set(expected)
        unequal = [n for n in expected if not torch.equal(got[n], expected[n])]
        assert not unequal, (out, unequal[:5])
    trace = json.loads((tmp_path / "fast" / "fw_trace.json").read_text())
    assert len(trace["iterations"]) == 1 and trace["iterations"][0]["gamma"] == 0.0 and "epsilon" in trace["stopped"]
    table = json.loads((tmp_path / "fast" / "fw_table.json").read_text())
    assert table["vertices"][-1] == "init" and table["init"]["source"] == str(ta)


@pytest.mark.slow
# the box (the default), the scaled hull (the hull is its radius-1 case; CI time) and the capped box
@pytest.mark.parametrize("constraint", [{}, {"constraint": "scaled_hull", "radius": 2.0},
                                        {"constraint": "capped_box", "radius": 1.5}],
                         ids=["box", "scaled_hull", "capped_box"])
def test_ta_init_run_agrees_in_all_three_paths(random_pool, tmp_path, constraint):
    ta = _ta(random_pool, tmp_path)
    fw = _fw(random_pool, tmp_path, init=str(ta), iterations=3, **constraint)
    mergekit_fw_here(fw, tmp_path / "fast")
    mergekit_yaml(fw, tmp_path / "yaml")
    replay(tmp_path / "fast", tmp_path / "replay", tmp_path / "lora_cache")
    documents = list(yaml.safe_load_all((tmp_path / "fast" / "fw_mergekit.yml").read_text()))
    assert [d.get("name") for d in documents] == ["fw-init", None]
    assert any(m["model"] == "fw-init" for m in documents[1]["models"])
    fast = tensors(tmp_path / "fast")
    assert_same_tensors(fast, tensors(tmp_path / "yaml"), tensors(tmp_path / "replay"))
    table = json.loads((tmp_path / "fast" / "fw_table.json").read_text())
    assert table["constraint"] == constraint.get("constraint", "box") and table["radius"] == constraint.get("radius")
    coefficients = torch.tensor(list(table["coefficients"].values()), dtype=torch.float64)  # tensors x candidates
    assert float(coefficients[:, -1].min()) < 1.0  # the solve moved away from the initial merge
    assert float(coefficients.min()) >= 0.0
    if table["constraint"] in ("box", "capped_box"):
        assert float(coefficients.max()) <= 1.0 + 1e-9
    if table["constraint"] != "box":
        assert float(coefficients.sum(dim=1).max()) <= constraint.get("radius", 1.0) + 1e-9


def test_continue_from_a_previous_table(random_pool, tmp_path):
    first = pool_and_parameters(load_merge_config(_fw(random_pool, tmp_path, iterations=2)))
    previous = solve(*first, progress=False)
    previous.table.save(tmp_path / "fw_table.json")
    spec, params = pool_and_parameters(load_merge_config(_fw(random_pool, tmp_path, "fw2.yml", init=str(tmp_path / "fw_table.json"), iterations=2)))
    continued = solve(spec, params, progress=False)
    assert abs(continued.trace.initial_loss - previous.trace.final_loss) < 1e-9
    assert continued.trace.final_loss <= previous.trace.final_loss
    assert continued.table.meta["continued_from"] == str(tmp_path / "fw_table.json")


@pytest.mark.parametrize(
    "init_config, message",
    [
        ({"merge_method": "task_arithmetic", "models": "stranger"}, "not in the pool"),
        ({"merge_method": "frank_wolfe"}, "cannot itself be frank_wolfe"),
        ({"merge_method": "task_arithmetic", "base_model": "other-base"}, "but the pool's base is"),
    ],
)
def test_bad_init_configs_fail_early_naming_the_file(random_pool, tmp_path, init_config, message):
    config = {"merge_method": "task_arithmetic", "base_model": str(random_pool["base"]),
              "models": [{"model": m["model"], "parameters": {"weight": 0.3}} for m in _models(random_pool)]}
    config.update({k: v for k, v in init_config.items() if k != "models"})
    if init_config.get("models") == "stranger":
        config["models"].append({"model": str(tmp_path / "stranger"), "parameters": {"weight": 0.3}})
    if config["merge_method"] == "frank_wolfe":
        config["models"] = [{"model": m["model"]} for m in config["models"]]
        config["parameters"] = {"calibration": "c.jsonl"}
    init = write_config(tmp_path / "bad_init.yml", config)
    spec, params = pool_and_parameters(load_merge_config(_fw(random_pool, tmp_path, init=str(init))))
    with pytest.raises(ConfigError, match=message) as error:
        solve(spec, params, progress=False)
    assert str(init) in str(error.value)


def test_missing_init_file_and_mismatched_table_are_named(random_pool, tmp_path):
    spec, params = pool_and_parameters(load_merge_config(_fw(random_pool, tmp_path, init=str(tmp_path / "none.yml"))))
    with pytest.raises(ConfigError, match="parameters.init: file not found"):
        solve(spec, params, progress=False)
    other = pool_and_parameters(load_merge_config(write_config(tmp_path / "small.yml", {
        "merge_method": "frank_wolfe", "base_model": str(random_pool["base"]), "models": _models(random_pool)[:1],
        "parameters": {"calibration": str(random_pool["calibration"]), "iterations": 1}, "dtype": "float32"})))
    solve(*other, progress=False).table.save(tmp_path / "small_table.json")
    spec, params = pool_and_parameters(load_merge_config(_fw(random_pool, tmp_path, init=str(tmp_path / "small_table.json"))))
    with pytest.raises(ConfigError, match="candidates .* differ from the pool"):
        solve(spec, params, progress=False)
    full = pool_and_parameters(load_merge_config(_fw(random_pool, tmp_path, "full.yml", iterations=1, constraint="hull")))
    solve(*full, progress=False).table.save(tmp_path / "convex_table.json")
    spec, params = pool_and_parameters(load_merge_config(
        _fw(random_pool, tmp_path, "ties.yml", merge_fn="ties", constraint="hull",
            init=str(tmp_path / "convex_table.json"))))
    with pytest.raises(ConfigError, match="merge_fn 'convex', this run uses 'ties'"):
        solve(spec, params, progress=False)
    spec, params = pool_and_parameters(load_merge_config(
        _fw(random_pool, tmp_path, "box.yml", constraint="box", init=str(tmp_path / "convex_table.json"))))
    with pytest.raises(ConfigError, match="constraint 'hull', this run uses 'box'"):
        solve(spec, params, progress=False)


def test_a_table_per_candidate_continues_per_rank_component_from_the_same_model(random_pool, tmp_path):
    """In the box, each component starts at its candidate's coefficient: the first loss
    is the finished run's last, and the components then move apart."""
    # every member in play (no screen), so every component has a coefficient to start from
    first = solve(*pool_and_parameters(load_merge_config(_fw(random_pool, tmp_path, iterations=2, screen_per_task=0))),
                  progress=False)
    first.table.save(tmp_path / "table.json")
    spec, params = pool_and_parameters(load_merge_config(
        _fw(random_pool, tmp_path, "rank.yml", iterations=2, granularity="rank_component",
            init=str(tmp_path / "table.json"), screen_per_task=0)))
    result = solve(spec, params, progress=False)
    assert result.table.granularity == "rank_component" and len(result.table.candidates) == 4 + 2 + 3 + 1
    assert abs(result.trace.initial_loss - first.trace.final_loss) < 1e-9 * abs(first.trace.final_loss)
    assert result.trace.final_loss < result.trace.initial_loss
    c = result.table.coefficients()
    assert float(c[:4].std(dim=0).max()) > 0  # the first adapter's components no longer move together
    # in a hull the components' total would be the rank times the candidate's weight: refused
    hull = solve(*pool_and_parameters(load_merge_config(_fw(random_pool, tmp_path, "h.yml", iterations=1,
                                                             constraint="hull"))), progress=False)
    hull.table.save(tmp_path / "hull.json")
    spec, params = pool_and_parameters(load_merge_config(
        _fw(random_pool, tmp_path, "rank_hull.yml", granularity="rank_component", constraint="hull",
            init=str(tmp_path / "hull.json"))))
    with pytest.raises(ConfigError, match="only in constraint box"):
        solve(spec, params, progress=False)
    # and back the other way: refused, naming both
    result.table.save(tmp_path / "rank.json")
    spec, params = pool_and_parameters(load_merge_config(_fw(random_pool, tmp_path, "back.yml",
                                                             granularity="candidate",
                                                             init=str(tmp_path / "rank.json"))))
    with pytest.raises(ConfigError, match="granularity 'rank_component', this run uses 'candidate'"):
        solve(spec, params, progress=False)
    # granularity auto (the default) continues a table at the granularity it was solved with
    spec, params = pool_and_parameters(load_merge_config(_fw(random_pool, tmp_path, "again.yml", iterations=1,
                                                             init=str(tmp_path / "rank.json"))))
    again = solve(spec, params, progress=False)
    assert again.table.granularity == "rank_component" and "init is a table" in again.table.meta["granularity_auto"]
