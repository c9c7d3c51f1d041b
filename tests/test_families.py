"""The model families users merge today, as tiny random models with LoRAs on their own
module names: Mistral, Qwen2 (q/k/v biases, tied embeddings), Gemma (tied, scaled
embeddings), Phi-3 (fused qkv_proj and gate_up_proj) and Llama-3 with tied embeddings.
For each: the oracle's scores against a dense brute force; the output of
``mergekit-fw run`` equal to PEFT's own deltas at the table's weights, tied embeddings
written once as the base has them; the adapter output merged by PEFT to the same
model; and ``mergekit-yaml`` writing the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from mergekit_fw.cli import main
from tests.oracle.helpers import all_deltas, assert_scores_match_brute_force, pool_spec
from tests.paths import lora_config, tensors

# family: (config class, its settings, the attention modules its adapters target)
FAMILIES = {
    "mistral": ("MistralConfig", {"tie_word_embeddings": False}, ["q_proj", "v_proj"]),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}, ["q_proj", "v_proj"]),
    "gemma": ("GemmaConfig", {"head_dim": 8, "tie_word_embeddings": True}, ["q_proj", "v_proj"]),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False, "pad_token_id": 0}, ["qkv_proj"]),
    "llama3_tied": ("LlamaConfig", {"tie_word_embeddings": True}, ["q_proj", "v_proj"]),
}


def _build(root: Path, family: str) -> dict:
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from testbed.build import SIX, build_tokenizer

    config_class, settings, attention = FAMILIES[family]
    base_dir = root / "base"
    tokenizer = build_tokenizer(base_dir, list(SIX))
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, **settings,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(base_dir))
    adapters = []
    for index, targets in enumerate([attention, "all-linear"]):
        torch.manual_seed(10 + index)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                               LoraConfig(r=2 + index, lora_alpha=4, target_modules=targets, init_lora_weights=False))
        model.save_pretrained(str(root / f"lora{index}"))
        adapters.append(root / f"lora{index}")
    calibration = root / "calib.jsonl"
    calibration.write_text("".join(
        json.dumps({"task": task, "prompt": f"{task} a b c d", "completion": "= d c b a"[: 3 + 2 * (i % 3)]}) + "\n"
        for task in ("reverse", "sort") for i in range(4)))
    return {"root": root, "base": base_dir, "adapters": adapters, "calibration": calibration}


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict]:
    return {family: _build(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_scores_match_a_dense_brute_force(family, families):
    assert_scores_match_brute_force(families[family], ("lora",), seed=1, scale=0.5)


def _keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            keys |= set(handle.keys())
    return keys


@pytest.mark.parametrize("family", FAMILIES)
def test_the_output_is_peft_at_the_tables_weights_with_ties_kept(family, families, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    pool = families[family]
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    base = pool["base"]
    config = lora_config(tmp_path / "fw.yml", base, pool["adapters"], pool["calibration"], iterations=3)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(config), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "fw_table.json").read_text())
    written, base_tensors = tensors(out), tensors(base)
    assert _keys(out) == _keys(base)  # a tied lm_head is not written: one tensor, as the base has it
    deltas = all_deltas(pool, pool_spec(pool, kinds=("lora",)))
    moved = 0
    for name, value in base_tensors.items():
        expected = value.to(torch.float64).clone()
        for i, delta in enumerate(deltas):
            if name in delta:
                expected += table["coefficients"].get(name, [0.0] * len(deltas))[i] * delta[name]
        torch.testing.assert_close(written[name].to(torch.float64), expected, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(written[name], value)
    assert moved > 0
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    tied = FAMILIES[family][1]["tie_word_embeddings"]
    assert merged.config.tie_word_embeddings == tied
    same = merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    assert same == tied

    # the same table as a PEFT adapter: PEFT's merge on the base is the output (ties kept)
    adapter = tmp_path / "adapter"
    result = CliRunner().invoke(main, ["run", str(config), str(adapter), "--quiet", "--output-format", "adapter"])
    assert result.exit_code == 0, result.output
    from peft import PeftModel

    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    peft_merged = peft_merged.merge_and_unload()
    for name, value in peft_merged.state_dict().items():
        torch.testing.assert_close(value, merged.state_dict()[name], rtol=1e-5, atol=1e-6)
    assert (peft_merged.lm_head.weight.data_ptr() == peft_merged.get_input_embeddings().weight.data_ptr()) == tied

    # and through stock mergekit-yaml: the same bytes
    from tests.paths import mergekit_yaml

    mergekit_yaml(config, tmp_path / "yaml", None, MERGEKIT_FW_CACHE=str(tmp_path / "cache"))
    assert _keys(tmp_path / "yaml") == _keys(out)
    from_yaml = tensors(tmp_path / "yaml")
    assert all(torch.equal(from_yaml[name], written[name]) for name in written)


def test_an_adapter_retraining_a_tied_lm_head_is_refused_with_the_reason(families, tmp_path, monkeypatch):
    """PEFT merges one by untying lm_head from the embeddings; the base here stores no
    lm_head at all, so the adapter is refused before any maths, saying so."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pool = families["qwen2"]
    base = pool["base"]
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                      init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "lora_head"))
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    config = lora_config(tmp_path / "fw.yml", base, [tmp_path / "lora_head", pool["adapters"][0]], pool["calibration"],
                         iterations=2)
    result = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "ties it to the input embeddings (tie_word_embeddings: true" in result.output, result.output
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").rglob("fw_table.json"))
