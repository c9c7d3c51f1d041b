"""Full checkpoints and LoRAs in one pool, through both commands."""

import pytest
import torch
from safetensors.torch import load_file

from tests.paths import (
    assert_same_tensors,
    mergekit_fw_here,
    mergekit_yaml,
    tensors,
    write_config,
)

pytestmark = pytest.mark.slow


def test_dense_and_lora_candidates_merge_the_same_in_both_paths(random_pool, tmp_path):
    config = {
        "merge_method": "frank_wolfe",
        "base_model": str(random_pool["base"]),
        "models": [
            {"model": f"{random_pool['base']}+{random_pool['adapters'][0]}"},
            {"model": str(random_pool["dense"][0])},
            {"model": str(random_pool["dense"][1])},
        ],
        "parameters": {"calibration": str(random_pool["calibration"]), "iterations": 3},
        "dtype": "float32",
    }
    path = write_config(tmp_path / "fw.yml", config)
    cache = str(tmp_path / "fw_cache")
    mergekit_fw_here(path, tmp_path / "fast", MERGEKIT_FW_CACHE=cache)
    mergekit_yaml(path, tmp_path / "yaml", MERGEKIT_FW_CACHE=cache)
    fast = tensors(tmp_path / "fast")
    assert_same_tensors(fast, tensors(tmp_path / "yaml"))
    base = load_file(str(random_pool["base"] / "model.safetensors"))
    # dense candidates move tensors no LoRA touches (norms, embeddings)
    assert not torch.equal(fast["model.norm.weight"], base["model.norm.weight"]) or not torch.equal(
        fast["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
