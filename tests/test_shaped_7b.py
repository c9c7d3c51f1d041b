"""A LLaMA-7B-shaped model on a CPU: bf16 oracle, gradient checkpointing and a
sharded out-of-core write, through the real command (``evals/shaped_pool.py``
builds the model: real widths, 2 layers). On a CPU without native bf16 products
this runs only because the oracle takes its backward in float32
(``mergekit_fw/oracle/half_backward.py``): without that it took over ten minutes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from evals.shaped_pool import build_pool, fw_config
from mergekit_fw.pool.candidates import LoraFactors
from tests.paths import mergekit_fw_run, write_config

pytestmark = pytest.mark.slow


def test_seven_b_shaped_merge_in_bf16_with_checkpointing_writes_mergekit_shards(tmp_path_factory):
    """One run for all three (the pool alone is 1.3 GB): ``--out-shard-size`` splits
    the output into mergekit's shards, and a merged tensor read back through the
    index is the dense sum of the adapters at the table's weights. (The default shard
    size's single unindexed file: ``tests/output/test_writer.py``.)"""
    root = tmp_path_factory.mktemp("shaped")
    pool = build_pool(root, 2)
    config = fw_config(pool, iterations=1, step="schedule", gradient_checkpointing=True)
    config["parameters"]["samples_per_task"] = 2
    fw = write_config(root / "fw.yml", config)
    out = root / "out"
    done = mergekit_fw_run(fw, out, "--out-shard-size", "400M", MERGEKIT_FW_CACHE=str(root / "cache"))
    assert "merged model written" in done.stdout
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 4096
    assert yaml.safe_load((out / "fw_mergekit.yml").read_text())["merge_method"] == "task_arithmetic"

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3  # mergekit's shard naming and index file
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    for shard in shards:
        assert (out / shard).stat().st_size <= 400 * 1000**2 + 300 * 2**20  # one shard plus at most one tensor

    table = json.loads((out / "fw_table.json").read_text())
    trace = json.loads((out / "fw_trace.json").read_text())
    assert trace["final_loss"] < trace["initial_loss"]
    assert set(trace["seconds"]) == {"oracle", "lmo", "step", "write"}

    # one merged tensor, recomputed densely from the adapters and the table
    name = max(table["coefficients"], key=lambda n: sum(table["coefficients"][n]))
    with safe_open(str(out / index["weight_map"][name]), framework="pt") as handle:
        written = handle.get_tensor(name)
    assert written.dtype == torch.bfloat16 and written.shape[0] in (4096, 11008)
    with safe_open(str(pool["base"] / "model.safetensors"), framework="pt") as handle:
        base = handle.get_tensor(name).float()
    expected = base.clone()
    coefficients = table["coefficients"][name]
    assert any(c > 0 for c in coefficients)
    adapter_config = [json.loads((a / "adapter_config.json").read_text()) for a in pool["adapters"]]
    for c, adapter, settings in zip(coefficients, pool["adapters"], adapter_config):
        prefix = "base_model.model." + name.removesuffix(".weight")
        factors = LoraFactors(adapter / "adapter_model.safetensors", f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight",
                              settings["lora_alpha"] / settings["r"], settings["r"], tuple(written.shape))
        expected += c * factors.delta()
    # bf16 rounding of the sum, and an error far below the merged delta itself
    torch.testing.assert_close(written.float(), expected, rtol=2**-7, atol=1e-6)
    error = torch.linalg.vector_norm(written.float() - expected)
    assert error < 0.1 * torch.linalg.vector_norm(expected - base)
