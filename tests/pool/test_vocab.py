"""Candidates with an extended vocabulary, aligned to the base's with ``tokenizer_source: base``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_fw.cli import main
from mergekit_fw.pool.vocab import align_rows, vocab_map
from tests.paths import mergekit_yaml, tensors, write_config


@pytest.fixture(scope="module")
def extended(random_pool, tmp_path_factory):
    """dense0 with three added tokens (new rows in embed_tokens and lm_head), as a
    fine-tune that added special tokens saves itself."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("extended") / "dense_ext"
    tokenizer = AutoTokenizer.from_pretrained(str(random_pool["dense"][0]))
    tokenizer.add_tokens(["<tool>", "</tool>", "<think>"])
    model = LlamaForCausalLM.from_pretrained(str(random_pool["dense"][0]))
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(3)
    with torch.no_grad():
        model.get_input_embeddings().weight[-3:] = torch.randn(3, model.config.hidden_size)
        model.get_output_embeddings().weight[-3:] = torch.randn(3, model.config.hidden_size)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def _config(random_pool, extended, path, **top):
    base = random_pool["base"]
    models = [{"model": f"{base}+{random_pool['adapters'][0]}"}, {"model": str(extended)}, {"model": str(random_pool["dense"][1])}]
    return write_config(path, {"merge_method": "frank_wolfe", "base_model": str(base), "models": models, "dtype": "float32",
                               "parameters": {"calibration": str(random_pool["calibration"]), "iterations": 3}, **top})


def test_align_rows_takes_rows_by_token_and_the_base_row_where_missing():
    value = torch.arange(12.0).reshape(6, 2)  # the candidate's rows
    base = -torch.ones(4, 2)
    index = torch.tensor([5, -1, 0, 2])
    assert torch.equal(align_rows(value, index, base), torch.tensor([[10.0, 11.0], [-1.0, -1.0], [0.0, 1.0], [4.0, 5.0]]))


def test_vocab_map_matches_tokens_not_ids(random_pool, extended):
    from transformers import AutoTokenizer

    index = vocab_map(random_pool["base"], extended, "candidate x:")
    base_vocab = AutoTokenizer.from_pretrained(str(random_pool["base"])).get_vocab()
    other = AutoTokenizer.from_pretrained(str(extended)).get_vocab()
    assert index.shape[0] == len(base_vocab)
    for token, i in base_vocab.items():
        assert int(index[i]) == other[token]


def test_without_tokenizer_source_the_other_vocabulary_is_refused(random_pool, extended, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    config = _config(random_pool, extended, tmp_path / "fw.yml")
    result = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2
    assert str(extended) in result.output and "tokenizer_source: base" in result.output


def test_tokenizer_source_base_aligns_and_merges_on_the_base_vocabulary(random_pool, extended, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    config = _config(random_pool, extended, tmp_path / "fw.yml", tokenizer_source="base")
    result = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    out = tensors(tmp_path / "out")
    base = load_file(str(random_pool["base"] / "model.safetensors"))
    ext = load_file(str(extended / "model.safetensors"))
    other = load_file(str(random_pool["dense"][1] / "model.safetensors"))
    table = json.loads((tmp_path / "out" / "fw_table.json").read_text())
    names = table["candidates"]
    for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = base[tensor].shape[0]
        assert out[tensor].shape == base[tensor].shape
        weights = dict(zip(names, table["coefficients"][tensor]))
        expected = base[tensor].double() + weights[str(extended)] * (ext[tensor][:rows].double() - base[tensor].double())
        expected += weights[str(random_pool["dense"][1])] * (other[tensor].double() - base[tensor].double())
        torch.testing.assert_close(out[tensor].double(), expected, rtol=1e-5, atol=1e-6)
    picked = [table["coefficients"][t][names.index(str(extended))] for t in ("model.embed_tokens.weight", "lm_head.weight")]
    assert max(picked) > 0, picked  # the aligned rows really entered the merge
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == base["lm_head.weight"].shape[0]


@pytest.mark.slow
def test_the_mergekit_path_writes_the_same_bytes(random_pool, extended, tmp_path):
    config = _config(random_pool, extended, tmp_path / "fw.yml", tokenizer_source="base")
    from tests.paths import mergekit_fw_here

    mergekit_fw_here(config, tmp_path / "fast", MERGEKIT_FW_CACHE=str(tmp_path / "cache"))
    mergekit_yaml(config, tmp_path / "yaml", MERGEKIT_FW_CACHE=str(tmp_path / "cache"))
    fast, slow = tensors(tmp_path / "fast"), tensors(tmp_path / "yaml")
    assert fast.keys() == slow.keys()
    assert all(torch.equal(fast[k], slow[k]) for k in fast)
    shutil.rmtree(tmp_path / "lora_cache", ignore_errors=True)


def _saved_head_adapter(random_pool, extended, folder, with_tokenizer: bool):
    """A LoRA whose modules_to_save lm_head has the extended vocabulary's rows."""
    from safetensors.torch import save_file

    adapter = shutil.copytree(random_pool["saved_adapter"], folder)
    file = adapter / "adapter_model.safetensors"
    data = load_file(str(file))
    data["base_model.model.lm_head.weight"] = load_file(str(extended / "model.safetensors"))["lm_head.weight"]
    save_file(data, str(file), metadata={"format": "pt"})
    if with_tokenizer:
        for item in extended.glob("tokenizer*"):
            shutil.copy(item, adapter / item.name)
    return adapter


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_modules_to_save_with_an_extended_vocabulary(random_pool, extended, tmp_path, monkeypatch, with_tokenizer):
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    adapter = _saved_head_adapter(random_pool, extended, tmp_path / "adapter", with_tokenizer)
    base = random_pool["base"]
    config = write_config(tmp_path / "fw.yml", {
        "merge_method": "frank_wolfe", "base_model": str(base), "dtype": "float32", "tokenizer_source": "base",
        "models": [{"model": f"{base}+{adapter}"}, {"model": str(random_pool["dense"][1])}],
        "parameters": {"calibration": str(random_pool["calibration"]), "iterations": 2}})
    result = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "--quiet"])
    if not with_tokenizer:
        assert result.exit_code == 2 and "no readable tokenizer" in result.output and str(adapter) in result.output
        return
    assert result.exit_code == 0, result.output
    out = tensors(tmp_path / "out")
    base_head = load_file(str(base / "model.safetensors"))["lm_head.weight"]
    ext_head = load_file(str(extended / "model.safetensors"))["lm_head.weight"]
    other = load_file(str(random_pool["dense"][1] / "model.safetensors"))["lm_head.weight"]
    table = json.loads((tmp_path / "out" / "fw_table.json").read_text())
    weights = dict(zip(table["candidates"], table["coefficients"]["lm_head.weight"]))
    expected = base_head.double() + weights[f"{base}+{adapter}"] * (ext_head[: base_head.shape[0]].double() - base_head.double())
    expected += weights[str(random_pool["dense"][1])] * (other.double() - base_head.double())
    torch.testing.assert_close(out["lm_head.weight"].double(), expected, rtol=1e-5, atol=1e-6)
