"""``mergekit-fw inspect`` and the checks that warn rather than refuse: outliers
(left out with exclude_outliers), adapters recorded against another base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_fw.cli import main
from tests.paths import write_config


@pytest.fixture(scope="module")
def hostile(random_pool, tmp_path_factory):
    """The random pool plus a broken checkpoint (task vector 100x the others') and
    an adapter whose config names another base."""
    root = tmp_path_factory.mktemp("hostile")
    broken = shutil.copytree(random_pool["dense"][0], root / "broken")
    base = load_file(str(random_pool["base"] / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    save_file({k: v + 5.0 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(broken / "model.safetensors"),
              metadata={"format": "pt"})
    foreign = shutil.copytree(random_pool["adapters"][1], root / "foreign")
    config = json.loads((foreign / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/another-model-7b"
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    return {"broken": broken, "foreign": foreign, "root": root}


def _config(random_pool, hostile, path, **parameters):
    base = random_pool["base"]
    models = [{"model": f"{base}+{random_pool['adapters'][0]}"}, {"model": f"{base}+{hostile['foreign']}"},
              {"model": f"{base}+{random_pool['adapters'][2]}"}, {"model": f"{base}+{random_pool['saved_adapter']}"},
              {"model": str(random_pool["dense"][0])}, {"model": str(random_pool["dense"][1])},
              {"model": str(hostile["broken"])}]
    return write_config(path, {"merge_method": "frank_wolfe", "base_model": str(base), "models": models, "dtype": "float32",
                               "parameters": {"calibration": str(random_pool["calibration"]), "iterations": 2, **parameters}})


def test_inspect_lists_every_candidate_with_a_verdict(random_pool, hostile, tmp_path):
    config = _config(random_pool, hostile, tmp_path / "fw.yml")
    result = CliRunner().invoke(main, ["inspect", str(config), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = {row["name"]: row for row in report["candidates"]}
    assert len(rows) == 7
    verdicts = {name.split("/")[-1].split("+")[-1]: row["verdict"] for name, row in rows.items()}
    assert verdicts["broken"] == "outlier"
    assert verdicts["foreign"] == "warning"
    assert {v for k, v in verdicts.items() if k not in ("broken", "foreign")} == {"ok"}
    saved = next(r for n, r in rows.items() if n.endswith("lora_saved"))
    assert saved["modules_to_save"] == ["lm_head"] and saved["targets"] == ["k_proj"] and saved["kind"] == "lora"
    assert set(saved["block_norms"]) == {"layer 0", "layer 1", "head"}
    lora0 = next(r for n, r in rows.items() if n.endswith("lora0"))
    assert lora0["rank"] == "4" and lora0["rslora"] is False and lora0["targets"] == ["q_proj", "v_proj"]

    table = CliRunner().invoke(main, ["inspect", str(config)]).output
    assert "verdict" in table and "outlier" in table and "someone/another-model-7b" in table
    assert "task-vector norm per block" in table


def test_block_norms_are_the_dense_norms(random_pool, hostile, tmp_path):
    """Low-rank norms per block equal the norms of the densely expanded deltas."""
    from tests.oracle.helpers import peft_deltas

    config = _config(random_pool, hostile, tmp_path / "fw.yml")
    report = json.loads(CliRunner().invoke(main, ["inspect", str(config), "--json"]).output)
    row = next(r for r in report["candidates"] if r["name"].endswith("lora_saved"))
    deltas = peft_deltas(random_pool["base"], random_pool["saved_adapter"])
    for block, prefix in (("layer 0", "model.layers.0."), ("layer 1", "model.layers.1."), ("head", "lm_head")):
        dense = sum(float(d.pow(2).sum()) for k, d in deltas.items() if k.startswith(prefix)) ** 0.5
        assert row["block_norms"][block] == pytest.approx(dense, rel=1e-6)


def test_exclude_outliers_leaves_the_broken_model_out_and_says_why(random_pool, hostile, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    config = _config(random_pool, hostile, tmp_path / "fw.yml", exclude_outliers=True)
    result = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "out" / "fw_table.json").read_text())
    trace = json.loads((tmp_path / "out" / "fw_trace.json").read_text())
    assert not any(name.endswith("broken") for name in table["candidates"]) and len(table["candidates"]) == 6
    (excluded, reason), = trace["excluded"].items()
    assert excluded.endswith("broken") and "median" in reason
    assert any(name.endswith("foreign") for name in trace["warnings"])


def test_without_exclude_outliers_the_outlier_stays_with_a_warning(random_pool, hostile, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    config = _config(random_pool, hostile, tmp_path / "fw.yml")
    result = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "out" / "fw_table.json").read_text())
    assert any(name.endswith("broken") for name in table["candidates"])
    assert any("broken" in r.getMessage() and "median" in r.getMessage() for r in caplog.records)


def test_inspect_exits_1_when_a_candidate_is_refused(random_pool, hostile, tmp_path):
    cut = shutil.copytree(random_pool["adapters"][0], tmp_path / "cut")
    (cut / "adapter_model.safetensors").write_bytes((cut / "adapter_model.safetensors").read_bytes()[:-50])
    config = write_config(tmp_path / "fw.yml", {
        "merge_method": "frank_wolfe", "base_model": str(random_pool["base"]),
        "models": [{"model": f"{random_pool['base']}+{cut}"}, {"model": str(random_pool["dense"][0])}],
        "parameters": {"calibration": str(random_pool["calibration"])}})
    result = CliRunner().invoke(main, ["inspect", str(config)])
    assert result.exit_code == 1
    assert "refused" in result.output and "truncated" in result.output and str(cut) in result.output


def test_reading_checks_are_remembered_until_a_file_changes(random_pool, hostile, tmp_path, monkeypatch):
    """NaN scans and dense norms read whole checkpoints: done once per file version."""
    import os

    from mergekit_fw.integration.configs import load_merge_config, pool_and_parameters
    from mergekit_fw.pool import validate

    spec, _ = pool_and_parameters(load_merge_config(_config(random_pool, hostile, tmp_path / "fw.yml")))
    reads = []  # what was read: the base's NaN scan, and each candidate's deltas
    scan, norms = validate._scan_index, validate._norms
    monkeypatch.setattr(validate, "_scan_index", lambda index, names, what: reads.append(what) or scan(index, names, what))
    monkeypatch.setattr(validate, "_norms", lambda candidate, base: reads.append(candidate.name) or norms(candidate, base))
    first = validate.check_pool(spec, cache=tmp_path / "checks")
    assert len(reads) == 8  # the base and seven candidates
    second = validate.check_pool(spec, cache=tmp_path / "checks")
    assert len(reads) == 8
    assert first.to_json() == second.to_json()
    os.utime(hostile["broken"] / "model.safetensors")  # touched, same bytes: still known
    validate.check_pool(spec, cache=tmp_path / "checks")
    assert len(reads) == 8
    moved = shutil.copytree(random_pool["dense"][1], tmp_path / "redownloaded")
    spec2, _ = pool_and_parameters(load_merge_config(_config(random_pool, {**hostile, "broken": moved}, tmp_path / "fw2.yml")))
    tensors = load_file(str(moved / "model.safetensors"))
    save_file({k: v * 1.5 for k, v in tensors.items()}, str(moved / "model.safetensors"), metadata={"format": "pt"})
    validate.check_pool(spec2, cache=tmp_path / "checks")
    assert reads[8:] == [str(moved)]  # only the changed file is read again
