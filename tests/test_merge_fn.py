"""merge_fn ties: each iterate is mergekit's own ties at the table's weights."""

import json

import pytest
import torch
import yaml

from mergekit_fw.integration.stock import ties_merge_function
from mergekit_fw.merge_fn import convex_merge, merge_function, single_vertex
from tests.paths import (
    assert_same_tensors,
    mergekit_fw_here,
    mergekit_yaml,
    replay,
    tensors,
    write_config,
)


def test_ties_without_mergekits_kernel_is_refused_by_name():
    with pytest.raises(ValueError, match="merge_fn 'ties' is mergekit's own kernel"):
        merge_function("ties", 0.4)


def test_ties_merge_function_is_mergekits_ties():
    from mergekit.merge_methods.api import merge_tensors

    torch.manual_seed(0)
    base = torch.randn(6, 5)
    deltas = [torch.randn(6, 5) for _ in range(3)]
    weights = [0.5, 0.2, 0.3]
    got = merge_function("ties", 0.4, ties=ties_merge_function)("w", base, deltas, weights)
    expected = merge_tensors([base, *(base + d for d in deltas)], "ties", base_index=0,
                             parameters={"weight": weights, "density": 0.4, "normalize": False, "lambda": 1.0})
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, convex_merge("w", base, deltas, weights))  # ties is not the weighted sum


def test_single_vertex_only_for_a_lone_unit_weight():
    assert single_vertex([0.0, 1.0, 0.0]) == 1
    assert single_vertex([0.5, 0.5]) is None and single_vertex([0.0, 0.9]) is None


@pytest.mark.slow
def test_ties_run_agrees_in_all_three_paths_and_is_marked_off_hull(random_pool, tmp_path):
    fw = write_config(tmp_path / "fw.yml", {
        "merge_method": "frank_wolfe", "base_model": str(random_pool["base"]),
        "models": [{"model": f"{random_pool['base']}+{a}"} for a in random_pool["adapters"]],
        "parameters": {"calibration": str(random_pool["calibration"]), "merge_fn": "ties", "density": 0.5, "iterations": 3},
        "dtype": "float32",
    })
    mergekit_fw_here(fw, tmp_path / "fast")
    mergekit_yaml(fw, tmp_path / "yaml")
    replay(tmp_path / "fast", tmp_path / "replay", tmp_path / "lora_cache")
    assert_same_tensors(tensors(tmp_path / "fast"), tensors(tmp_path / "yaml"), tensors(tmp_path / "replay"))
    replay_config = yaml.safe_load((tmp_path / "fast" / "fw_mergekit.yml").read_text())
    assert replay_config["merge_method"] == "ties" and replay_config["parameters"]["density"] == 0.5
    trace = json.loads((tmp_path / "fast" / "fw_trace.json").read_text())
    assert trace["in_hull"] is False and trace["final_loss"] < trace["initial_loss"]
