"""``mergekit-yaml`` with ``frank_wolfe`` expands no adapter: no ``--lora-merge-cache``
is needed, one that is given stays empty, mergekit's graph reads base tensors only,
memory does not grow with the pool beyond the adapters' own bytes, and the output
is byte for byte the fast path's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import subprocess_env
from tests.paths import mergekit_fw_here, mergekit_yaml, tensors, write_config

pytestmark = pytest.mark.slow


def _fw_config(pool: dict, references: list[str], **parameters) -> dict:
    return {
        "merge_method": "frank_wolfe",
        "base_model": str(pool["base"]),
        "models": [{"model": reference} for reference in references],
        "parameters": {"calibration": str(pool["calibration"]), "iterations": 3, **parameters},
        "dtype": "float32",
    }


def _mixed_references(pool: dict) -> list[str]:
    """Every kind of member: LoRAs (one rsLoRA), one with modules_to_save, a full fine-tune."""
    base = pool["base"]
    return [f"{base}+{a}" for a in pool["adapters"]] + [f"{base}+{pool['saved_adapter']}", str(pool["dense"][0])]


def test_graph_config_references_the_base_alone(random_pool, tmp_path):
    from mergekit_fw.integration.configs import load_merge_config
    from mergekit_fw.integration.mergekit_yaml import graph_config

    config = load_merge_config(write_config(tmp_path / "fw.yml", _fw_config(random_pool, _mixed_references(random_pool))))
    planned = graph_config(config)
    assert [str(m) for m in planned.referenced_models()] == [str(random_pool["base"])]
    assert planned.merge_method == config.merge_method and planned.parameters == config.parameters
    assert len(config.referenced_models()) == 6  # the user's config is left as it was


def test_no_cache_needed_and_the_output_is_the_fast_paths_byte_for_byte(random_pool, tmp_path):
    path = write_config(tmp_path / "fw.yml", _fw_config(random_pool, _mixed_references(random_pool)))
    cache = str(tmp_path / "fw_cache")
    mergekit_fw_here(path, tmp_path / "fast", MERGEKIT_FW_CACHE=cache)
    mergekit_yaml(path, tmp_path / "yaml", MERGEKIT_FW_CACHE=cache)  # no --lora-merge-cache
    fast, from_yaml = tensors(tmp_path / "fast"), tensors(tmp_path / "yaml")
    assert set(fast) == set(from_yaml)
    differ = [n for n in fast if fast[n].dtype != from_yaml[n].dtype or not torch.equal(fast[n], from_yaml[n])]
    assert not differ, differ[:5]
    base = tensors(random_pool["base"])
    assert any(not torch.equal(fast[n], base[n]) for n in base)  # the comparison can fail: the merge moved tensors
    for name in ("fw_table.json", "fw_trace.json", "fw_mergekit.yml", "README.md", "mergekit_config.yml"):
        assert (tmp_path / "yaml" / name).is_file(), name
    card = (tmp_path / "yaml" / "README.md").read_text()
    for adapter in random_pool["adapters"]:
        assert str(adapter) in card  # mergekit's card lists the pool as written, not the base alone
    assert yaml.safe_load((tmp_path / "yaml" / "mergekit_config.yml").read_text())["models"] == \
        yaml.safe_load(path.read_text())["models"]


def test_a_given_lora_merge_cache_stays_empty(random_pool, tmp_path):
    path = write_config(tmp_path / "fw.yml", _fw_config(random_pool, _mixed_references(random_pool)))
    cache = tmp_path / "lora_cache"
    cache.mkdir()
    mergekit_yaml(path, tmp_path / "yaml", cache, MERGEKIT_FW_CACHE=str(tmp_path / "fw_cache"))
    assert (tmp_path / "yaml" / "fw_table.json").is_file()
    assert list(cache.iterdir()) == []


def test_stock_methods_still_expand_adapters_into_the_cache(random_pool, tmp_path):
    """The hook leaves other methods alone: task_arithmetic over BASE+ADAPTER still
    needs mergekit's cache and fills it (the assertion above can fail)."""
    base = random_pool["base"]
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "models": [{"model": f"{base}+{a}", "parameters": {"weight": 0.5}} for a in random_pool["adapters"][:2]]}
    path = write_config(tmp_path / "ta.yml", config)
    done = subprocess.run(["mergekit-yaml", str(path), str(tmp_path / "no_cache"), "--quiet"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "cache dir" in done.stderr
    mergekit_yaml(path, tmp_path / "ta", tmp_path / "lora_cache")
    assert len(list((tmp_path / "lora_cache").iterdir())) == 2


PEAK_PROBE = (
    "import resource, subprocess, sys\n"
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
)


def _peak_rss(argv: list[str], env: dict) -> int:
    """Peak RSS in bytes of one fresh ``argv`` process (its own, measured by its parent)."""
    done = subprocess.run([sys.executable, "-c", PEAK_PROBE, *argv], env=env, capture_output=True, text=True,
                          timeout=600, check=True)
    return int(done.stdout.strip())


@pytest.fixture(scope="module")
def wide_pool(tmp_path_factory):
    """A random base big enough (~100 MB) that a full copy per adapter would show in
    RSS, and 8 rank-8 LoRAs on q/v (a few MB together)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from testbed.build import SIX, build_tokenizer

    root = tmp_path_factory.mktemp("wide_pool")
    tokenizer = build_tokenizer(root / "base", list(SIX))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    base.save_pretrained(str(root / "base"))
    adapters = []
    for index in range(8):
        torch.manual_seed(100 + index)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
        model.save_pretrained(str(root / f"lora{index}"))
        base = model.unload()
        adapters.append(root / f"lora{index}")
    calibration = root / "calib.jsonl"
    calibration.write_text("".join(
        json.dumps({"task": task, "prompt": f"{task} a b c", "completion": " c b a"}) + "\n"
        for task in ("reverse", "sort") for _ in range(2)))
    base_bytes = sum(p.stat().st_size for p in (root / "base").glob("*.safetensors"))
    return {"root": root, "base": root / "base", "adapters": adapters, "calibration": calibration,
            "base_bytes": base_bytes}


def test_peak_rss_does_not_grow_with_the_pool_beyond_the_adapters_bytes(wide_pool, tmp_path):
    peaks, adapter_bytes = {}, {}
    for count in (2, 8):
        adapters = wide_pool["adapters"][:count]
        config = _fw_config(wide_pool, [f"{wide_pool['base']}+{a}" for a in adapters], iterations=1)
        path = write_config(tmp_path / f"fw{count}.yml", config)
        env = subprocess_env(MERGEKIT_FW_CACHE=str(tmp_path / f"fw_cache{count}"))
        peaks[count] = _peak_rss(["mergekit-yaml", str(path), str(tmp_path / f"out{count}"), "--quiet"], env)
        adapter_bytes[count] = sum(f.stat().st_size for a in adapters for f in a.glob("*.safetensors"))
    grown = peaks[8] - peaks[2]
    # Six more full copies would add 6x the base's bytes; allow the adapters' own bytes
    # (several times over: factors, their float32 products) and a fifth of one base.
    allowed = 4 * (adapter_bytes[8] - adapter_bytes[2]) + wide_pool["base_bytes"] // 5
    assert grown <= allowed, (peaks, adapter_bytes, wide_pool["base_bytes"])


def test_sharded_outputs_are_the_same_files_when_the_base_lists_its_tensors_by_layer(random_pool, tmp_path):
    """mergekit writes tensors in the order of their names (its scheduler sorts by each
    task's group label), whatever order the base's index gives; hub checkpoints list
    theirs layer by layer (layers.2 before layers.10). With several shards the fast path
    must use mergekit's order, or the same tensors land in other files (found at full
    depth by ``evals/bench_7b.py``: tables and all 291 tensors equal, shards not)."""
    import re

    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(random_pool["base"]))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=12,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    base = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(str(base), max_shard_size="40KB")
    tokenizer.save_pretrained(str(base))
    index_file = base / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())

    def by_layer(name: str):
        match = re.match(r"model\.layers\.(\d+)\.", name)
        return (1, int(match.group(1)), name) if match else ((0, 0, name) if "embed" in name else (2, 0, name))

    index["weight_map"] = dict(sorted(index["weight_map"].items(), key=lambda item: by_layer(item[0])))
    index_file.write_text(json.dumps(index))
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(str(base)),
                                    LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft_model.save_pretrained(str(tmp_path / f"lora{seed}"))
        adapters.append(f"{base}+{tmp_path / f'lora{seed}'}")
    pool = {"base": base, "calibration": random_pool["calibration"]}
    path = write_config(tmp_path / "fw.yml", {**_fw_config(pool, adapters, iterations=1), "dtype": "bfloat16"})
    cache = str(tmp_path / "fw_cache")
    mergekit_fw_here(path, tmp_path / "fast", "--out-shard-size", "20K", MERGEKIT_FW_CACHE=cache)
    mergekit_yaml(path, tmp_path / "yaml", None, "--out-shard-size", "20K", MERGEKIT_FW_CACHE=cache)
    files = sorted(p.name for p in (tmp_path / "fast").glob("model*.safetensors*"))
    assert len(files) > 3 and files == sorted(p.name for p in (tmp_path / "yaml").glob("model*.safetensors*"))
    for name in files:
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "yaml" / name).read_bytes(), name
