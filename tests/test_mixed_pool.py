"""Full checkpoints and LoRAs in one pool, through both commands."""

import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import subprocess_env

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
    path = tmp_path / "fw.yml"
    path.write_text(yaml.safe_dump(config))
    env = subprocess_env(MERGEKIT_FW_CACHE=str(tmp_path / "fw_cache"))
    subprocess.run(["mergekit-fw", "run", str(path), str(tmp_path / "fast"), "--quiet"], check=True, env=env, capture_output=True, timeout=300)
    subprocess.run(["mergekit-yaml", str(path), str(tmp_path / "yaml"), "--lora-merge-cache", str(tmp_path / "cache"), "--quiet"],
                   check=True, env=env, capture_output=True, timeout=300)
    fast = load_file(str(tmp_path / "fast" / "model.safetensors"))
    slow = load_file(str(tmp_path / "yaml" / "model.safetensors"))
    base = load_file(str(random_pool["base"] / "model.safetensors"))
    assert set(fast) == set(slow)
    for name in fast:
        torch.testing.assert_close(slow[name], fast[name], rtol=1e-5, atol=1e-6)
    # dense candidates move tensors no LoRA touches (norms, embeddings)
    assert not torch.equal(fast["model.norm.weight"], base["model.norm.weight"]) or not torch.equal(
        fast["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
