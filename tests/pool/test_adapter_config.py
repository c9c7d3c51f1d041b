"""``adapter_config.json`` against the adapter's own tensors: one row per field that
decides the maths. Each contradiction is refused before any maths, naming the
adapter's file, the field and both values; a consistent config gives exactly PEFT's
merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_fw.pool.candidates import SafetensorsIndex, load_lora, read_model_config
from mergekit_fw.pool.references import PoolError


def _edit(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _tensors(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _embedding_lora(folder: Path) -> None:
    _tensors(folder, lambda t: t.update({
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 40),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(16, 4),
    }))
    _edit(folder, target_modules=["q_proj", "v_proj", "embed_tokens"])


def _conv_lora(folder: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _tensors(folder, lambda t: t.update({key: t[key].reshape(4, 16, 1, 1)}))


def _bias_keys(folder: Path) -> None:
    _edit(folder, bias="none")
    _tensors(folder, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.bias": torch.zeros(16)}))


# adapter 0 of random_pool: r 4, alpha 8, q_proj and v_proj of both layers, nn.Linear.
# row -> (edit of the adapter folder, fragments its message must hold)
ROWS = {
    "r": (lambda f: _edit(f, r=5), ["r = 5", "rank 4", "model.layers.0.self_attn.q_proj"]),
    "r not an integer": (lambda f: _edit(f, r="4"), ["r = '4'", "positive integer"]),
    "r zero": (lambda f: _edit(f, r=0), ["r = 0", "positive integer"]),
    "rank_pattern": (lambda f: _edit(f, rank_pattern={"v_proj": 2}), ["rank_pattern['v_proj'] = 2", "rank 4"]),
    "rank_pattern value": (lambda f: _edit(f, rank_pattern={"v_proj": 2.5}), ["rank_pattern['v_proj'] = 2.5"]),
    "target_modules": (lambda f: _edit(f, target_modules=["q_proj"]),
                       ["target_modules = ['q_proj']", "does not cover model.layers.0.self_attn.v_proj"]),
    "target_modules regex": (lambda f: _edit(f, target_modules=r".*\.q_proj"),
                             ["target_modules = '.*\\\\.q_proj'", "v_proj"]),
    "target_modules beyond the factors": (lambda f: _edit(f, target_modules=["q_proj", "v_proj", "k_proj"]),
                                          ["covers model.layers.0.self_attn.k_proj", "no LoRA factors"]),
    "target_modules regex with layers": (lambda f: _edit(f, target_modules=r".*\.(q|v)_proj", layers_to_transform=[0]),
                                         ["PEFT refuses this config", "layers_to_transform"]),
    "modules_to_save": (lambda f: _edit(f, modules_to_save=["lm_head"]),
                        ["modules_to_save = ['lm_head']", "no tensors for ['lm_head']"]),
    "target_modules type": (lambda f: _edit(f, target_modules=7), ["target_modules = 7", "list of strings"]),
    "exclude_modules": (lambda f: _edit(f, exclude_modules=["v_proj"]),
                        ["exclude_modules = ['v_proj']", "does not cover model.layers.0.self_attn.v_proj"]),
    "layers_to_transform": (lambda f: _edit(f, layers_to_transform=[0]),
                            ["layers_to_transform = [0]", "does not cover model.layers.1."]),
    "layers_to_transform type": (lambda f: _edit(f, layers_to_transform="0"),
                                 ["layers_to_transform = '0'", "integer"]),
    "layers_pattern": (lambda f: _edit(f, layers_to_transform=[0, 1], layers_pattern="blocks"),
                       ["layers_pattern = 'blocks'", "does not cover model.layers.0."]),
    "layers_pattern regex": (lambda f: _edit(f, layers_to_transform=[0], layers_pattern=["layers", "("]),
                             ["layers_pattern = ['layers', '(']", "'(' is not a valid regular expression"]),
    "modules_to_save regex": (lambda f: _edit(f, modules_to_save=["("]),
                              ["modules_to_save = ['(']", "not a valid regular expression"]),
    "layers_pattern alone": (lambda f: _edit(f, layers_pattern="layers"),
                             ["PEFT refuses this config", "`layers_to_transform` must also be specified"]),
    "lora_alpha": (lambda f: _edit(f, lora_alpha="16"), ["lora_alpha = '16'", "finite number"]),
    "lora_alpha bool": (lambda f: _edit(f, lora_alpha=True), ["lora_alpha = True", "finite number"]),
    "alpha_pattern": (lambda f: _edit(f, alpha_pattern={"q_proj": "x"}), ["alpha_pattern['q_proj'] = 'x'"]),
    "use_rslora": (lambda f: _edit(f, use_rslora="yes"), ["use_rslora = 'yes'", "true or false"]),
    "fan_in_fan_out": (lambda f: _edit(f, fan_in_fan_out=True),
                       ["fan_in_fan_out = true", "nn.Linear (out x in)", "it is false"]),
    "bias": (lambda f: _edit(f, bias="all"), ["bias = 'all'", "only 'none'"]),
    "bias value": (lambda f: _edit(f, bias="some"), ["bias = 'some'", "none, all, lora_only"]),
    "bias tensors": (_bias_keys, ["unsupported adapter tensor", "q_proj.bias"]),
    "use_dora": (lambda f: _edit(f, use_dora=True), ["use_dora = True", "DoRA"]),
    "lora_bias": (lambda f: _edit(f, lora_bias=True), ["lora_bias = True"]),
    "layer_replication": (lambda f: _edit(f, layer_replication=[[0, 2]]), ["layer_replication = [[0, 2]]"]),
    "peft_type": (lambda f: _edit(f, peft_type="IA3"), ["peft_type = 'IA3'"]),
    "embedding LoRA": (_embedding_lora, ["target_modules = ['q_proj', 'v_proj', 'embed_tokens']", "embedding",
                                         "lora_embedding_A"]),
    "convolution LoRA": (_conv_lora, ["target_modules = [", "convolution",
                                      "model.layers.0.self_attn.q_proj", "(4, 16, 1, 1)"]),
}


@pytest.fixture()
def base(random_pool):
    return read_model_config(random_pool["base"], "base_model"), SafetensorsIndex(random_pool["base"], "base_model")


@pytest.mark.parametrize("row", list(ROWS))
def test_a_config_that_contradicts_the_tensors_is_refused_naming_the_field(row, random_pool, base, tmp_path):
    folder = shutil.copytree(random_pool["adapters"][0], tmp_path / "adapter")
    edit, fragments = ROWS[row]
    edit(folder)
    with pytest.raises(PoolError) as caught:
        load_lora("lora0", folder, *base)
    message = str(caught.value)
    assert message.startswith("candidate lora0: " + str(folder)), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("row", ["r", "rank_pattern"])
def test_peft_refuses_the_rank_contradictions_too(row, random_pool, tmp_path):
    """The rows claim to refuse what PEFT refuses: PEFT's own loading fails on them."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    folder = shutil.copytree(random_pool["adapters"][0], tmp_path / "adapter")
    ROWS[row][0](folder)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(random_pool["base"])), str(folder))


def _peft_deltas(base_dir: Path, folder: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(base_dir))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload().state_dict()
    return {k: merged[k] - before[k] for k in before if not torch.equal(merged[k], before[k])}


@pytest.mark.parametrize("changes", [
    {"rank_pattern": {"v_proj": 4}, "alpha_pattern": {"v_proj": 3}},
    {"target_modules": r".*\.(q_proj|v_proj)", "lora_alpha": 5.5},
    {"layers_to_transform": [0, 1], "layers_pattern": "layers", "use_rslora": True},
    {"target_modules": None},  # PEFT's default for llama: q_proj and v_proj, what adapter 0 has
])
def test_a_consistent_config_gives_peft_merge(changes, random_pool, base, tmp_path):
    """Patterns, a regex target and layer indices read PEFT's way: the deltas are
    what PEFT's merge_and_unload gives for the same adapter."""
    folder = shutil.copytree(random_pool["adapters"][0], tmp_path / "adapter")
    _edit(folder, **changes)
    candidate = load_lora("lora0", folder, *base)
    expected = _peft_deltas(random_pool["base"], folder)
    assert set(candidate.factors) == set(expected)
    for tensor, factors in candidate.factors.items():
        torch.testing.assert_close(factors.delta(), expected[tensor], rtol=1e-5, atol=1e-6)
