"""The model families users merge today, as tiny random models with LoRAs on their own
module names: Mistral, Qwen2 (q/k/v biases, tied embeddings), Gemma (tied, scaled
embeddings), Phi-3 (fused qkv_proj and gate_up_proj) and Llama-3 with tied embeddings.
For each: the oracle's scores against a dense brute force; the output of
``mergekit-fw run`` equal to PEFT's own deltas at the table's weights, tied embeddings
written once as the base has them; the adapter output merged by PEFT to the same
model; and ``mergekit-yaml`` writing the same bytes."""

from __future__ import annotations

import json
import subprocess
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


def _merged(pool: dict, tmp_path: Path, monkeypatch, **parameters: object) -> tuple[Path, Path, dict]:
    """The pool's LoRAs merged by ``mergekit-fw run`` (3 iterations and ``parameters``): its
    config, output and table."""
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    config = lora_config(tmp_path / "fw.yml", pool["base"], pool["adapters"], pool["calibration"], iterations=3,
                         **parameters)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(config), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return config, out, json.loads((out / "fw_table.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_output_is_peft_at_the_tables_weights_with_ties_kept(family, families, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    pool = families[family]
    base = pool["base"]
    config, out, table = _merged(pool, tmp_path, monkeypatch)
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


def _saving_adapter(base: Path, folder: Path, modules_to_save: list[str], seed: int, **settings) -> Path:
    """A LoRA on q_proj whose ``modules_to_save`` copies are retrained (moved at random)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=modules_to_save,
                                      init_lora_weights=False, **settings))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(str(folder))
    return folder


HEAD, EMBEDDINGS = "lm_head.weight", "model.embed_tokens.weight"
# what each adapter saves whole: the head alone, the embeddings alone, both
SAVES = {"head": ["lm_head"], "embeddings": ["embed_tokens"], "both": ["embed_tokens", "lm_head"]}


@pytest.fixture(scope="module")
def saving_pools(families, tmp_path_factory) -> dict[str, dict]:
    """Tied bases (Qwen2, Gemma, Llama-3) with one adapter of each kind in SAVES and
    a plain LoRA: the pool unties the head, as PEFT's merge of any of them does."""
    pools = {}
    for family in ("qwen2", "gemma", "llama3_tied"):
        root = tmp_path_factory.mktemp(f"{family}_saving")
        pool = families[family]
        adapters = [_saving_adapter(pool["base"], root / f"saves_{kind}", modules, seed=20 + i)
                    for i, (kind, modules) in enumerate(SAVES.items())]
        pools[family] = {**pool, "adapters": [*adapters, pool["adapters"][0]]}
    return pools


def test_peft_unties_a_tied_head_for_each_kind_of_saving_adapter(saving_pools):
    """The reference the merge follows, held on the pinned PEFT: merging an adapter that
    saves either side of a tied pair writes both apart, the unsaved side at the base's values."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pool = saving_pools["qwen2"]
    for kind, adapter in zip(SAVES, pool["adapters"]):
        base = AutoModelForCausalLM.from_pretrained(str(pool["base"]))
        embeddings = base.get_input_embeddings().weight.detach().clone()
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        head, embed = merged.get_output_embeddings().weight, merged.get_input_embeddings().weight
        assert head.data_ptr() != embed.data_ptr()
        assert torch.equal(head, embeddings) == (kind == "embeddings")
        assert torch.equal(embed, embeddings) == (kind == "head")


@pytest.mark.parametrize("family", ["qwen2", "gemma", "llama3_tied"])
def test_oracle_scores_an_untied_head_against_a_dense_brute_force(family, saving_pools):
    scores, _ = assert_scores_match_brute_force(saving_pools[family], ("lora",), seed=2, scale=0.5)
    spec = pool_spec(saving_pools[family], kinds=("lora",))
    from tests.oracle.helpers import make_oracle

    _, pool, _ = make_oracle(saving_pools[family], spec)
    tensors = pool.tensor_names()
    assert HEAD in tensors and EMBEDDINGS in tensors  # one column each
    head = tensors.index(HEAD)
    assert float(scores[:, head].abs().max()) > 0  # the head has its own gradient


@pytest.mark.parametrize("family", ["qwen2", "gemma", "llama3_tied"])
def test_a_pool_that_saves_a_tied_head_is_merged_untied_as_peft_merges_it(family, saving_pools, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pool = saving_pools[family]
    base = pool["base"]
    # every member takes part: on these random adapters a screen may hold all the head's savers at 0
    config, out, table = _merged(pool, tmp_path, monkeypatch, screen_per_task=0)
    assert {HEAD, EMBEDDINGS} <= set(table["coefficients"])
    written = tensors(out)
    assert _keys(out) == _keys(base) | {HEAD}  # the head written apart, as PEFT writes it
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    embeddings = tensors(base)[EMBEDDINGS].to(torch.float64)
    deltas = all_deltas(pool, pool_spec(pool, kinds=("lora",)))
    for name in written:
        expected = (embeddings if name == HEAD else tensors(base)[name].to(torch.float64)).clone()
        for i, delta in enumerate(deltas):
            if name in delta:  # PEFT's deltas: a saved copy minus the original, the head's original tied
                expected += table["coefficients"][name][i] * delta[name]
        torch.testing.assert_close(written[name].to(torch.float64), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(written[HEAD], written[EMBEDDINGS])
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert merged.lm_head.weight.data_ptr() != merged.get_input_embeddings().weight.data_ptr()
    assert torch.equal(merged.lm_head.weight, written[HEAD])

    # as an adapter: PEFT's merge of it on the tied base is the same model
    adapter = tmp_path / "adapter"
    result = CliRunner().invoke(main, ["run", str(config), str(adapter), "--quiet", "--output-format", "adapter"])
    assert result.exit_code == 0, result.output
    assert {"lm_head", "model.embed_tokens"} <= set(json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"])
    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    peft_merged = peft_merged.merge_and_unload()
    assert peft_merged.lm_head.weight.data_ptr() != peft_merged.get_input_embeddings().weight.data_ptr()
    for name, value in peft_merged.state_dict().items():
        torch.testing.assert_close(value, merged.state_dict()[name], rtol=1e-5, atol=1e-6)

    # the card and the replay say the one step stock mergekit needs after it
    from mergekit_fw.output.export import UNTIE_COMMAND

    assert "**Untied:** This merge writes lm_head.weight apart from model.embed_tokens.weight" in (
        out / "README.md").read_text()
    assert UNTIE_COMMAND in (out / "README.md").read_text() and UNTIE_COMMAND in (out / "fw_mergekit.yml").read_text()

    # mergekit-yaml: the same bytes, the head included, where mergekit's architecture has one
    from tests.paths import mergekit_yaml, replay

    yaml_out = tmp_path / "yaml"
    if family == "gemma":  # mergekit's gemma architecture lists no lm_head.weight: refused, saying why
        from tests.conftest import subprocess_env

        done = subprocess.run(["mergekit-yaml", str(config), str(yaml_out), "--quiet"], capture_output=True, text=True,
                              env=subprocess_env(MERGEKIT_FW_CACHE=str(tmp_path / "cache")), timeout=600)
        assert done.returncode != 0 and "Traceback" not in done.stderr
        assert "mergekit's architecture for this base has no such weight" in done.stderr, done.stderr
        assert "mergekit-fw run" in done.stderr and not yaml_out.exists()
        return
    mergekit_yaml(config, yaml_out, None, MERGEKIT_FW_CACHE=str(tmp_path / "cache"))
    assert _keys(yaml_out) == _keys(out)
    assert json.loads((yaml_out / "config.json").read_text())["tie_word_embeddings"] is False
    from_yaml = tensors(yaml_out)
    assert all(torch.equal(from_yaml[name], written[name]) for name in written)
    assert [p.read_bytes() for p in sorted(yaml_out.glob("*.safetensors"))] == [
        p.read_bytes() for p in sorted(out.glob("*.safetensors"))
    ]

    # the stock replay (stock mergekit keeps the base's tie flag), then the step: the same model
    replayed = tmp_path / "replay"
    replay(out, replayed, tmp_path / "lora_cache")
    assert json.loads((replayed / "config.json").read_text())["tie_word_embeddings"] is True
    subprocess.run(UNTIE_COMMAND.replace("OUT/", f"{replayed}/"), shell=True, check=True, timeout=60)
    from_replay = AutoModelForCausalLM.from_pretrained(str(replayed))
    assert from_replay.lm_head.weight.data_ptr() != from_replay.get_input_embeddings().weight.data_ptr()
    for name, value in from_replay.state_dict().items():
        torch.testing.assert_close(value, merged.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_an_adapter_that_keeps_the_tie_moves_the_one_tensor_as_peft_does(families, tmp_path, monkeypatch):
    """Trained with ``ensure_weight_tying``, an adapter saving lm_head keeps one copy for
    both sides (PEFT saves it under both names and its merge keeps the tie): the merge
    keeps the tie too, one tensor written, and its adapter output says so to PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pool = families["qwen2"]
    base = pool["base"]
    kept = _saving_adapter(base, tmp_path / "kept", ["lm_head"], seed=30, ensure_weight_tying=True)
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    config = lora_config(tmp_path / "fw.yml", base, [kept, pool["adapters"][0]], pool["calibration"], iterations=3)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(config), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert _keys(out) == _keys(base) and json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    table = json.loads((out / "fw_table.json").read_text())
    assert HEAD not in table["coefficients"] and table["coefficients"][EMBEDDINGS][0] > 0
    embeddings = tensors(base)[EMBEDDINGS].to(torch.float64)
    peft_delta = all_deltas(pool, pool_spec({**pool, "adapters": [kept]}, kinds=("lora",)))[0][EMBEDDINGS]
    written = tensors(out)[EMBEDDINGS].to(torch.float64)
    torch.testing.assert_close(written, embeddings + table["coefficients"][EMBEDDINGS][0] * peft_delta,
                               rtol=1e-5, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()

    adapter = tmp_path / "adapter"
    result = CliRunner().invoke(main, ["run", str(config), str(adapter), "--quiet", "--output-format", "adapter"])
    assert result.exit_code == 0, result.output
    assert json.loads((adapter / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    peft_merged = peft_merged.merge_and_unload()
    for name, value in peft_merged.state_dict().items():
        torch.testing.assert_close(value, merged.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_members_that_keep_the_tie_move_the_untied_head_with_their_embeddings(families, tmp_path, monkeypatch):
    """In a pool that unties, a member whose own model keeps the pair tied (a tied full
    checkpoint, an adapter saved with ensure_weight_tying) moves the head with its
    embeddings: every output tensor is the base plus the members' own deltas, each
    member's taken from its own model as PEFT and transformers load it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.paths import write_config

    pool = families["qwen2"]
    base = pool["base"]
    unties = _saving_adapter(base, tmp_path / "unties", ["lm_head"], seed=40)
    kept = _saving_adapter(base, tmp_path / "kept", ["embed_tokens"], seed=41, ensure_weight_tying=True)
    dense = AutoModelForCausalLM.from_pretrained(str(base))
    torch.manual_seed(42)
    with torch.no_grad():
        for parameter in dense.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    dense.save_pretrained(str(tmp_path / "dense"))
    assert HEAD not in _keys(tmp_path / "dense")  # a tied checkpoint
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    config = write_config(tmp_path / "fw.yml", {
        "merge_method": "frank_wolfe", "base_model": str(base), "dtype": "float32",
        "models": [{"model": f"{base}+{unties}"}, {"model": f"{base}+{kept}"}, {"model": str(tmp_path / "dense")}],
        "parameters": {"calibration": str(pool["calibration"]), "iterations": 3},
    })
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(config), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "fw_table.json").read_text())

    def own(model) -> dict[str, torch.Tensor]:
        return {name: value.detach().to(torch.float64) for name, value in model.state_dict().items()}

    reference = own(AutoModelForCausalLM.from_pretrained(str(base)))
    members = [own(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(a)).merge_and_unload())
               for a in (unties, kept)] + [own(AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense")))]
    written = tensors(out)
    assert set(written) == set(reference) and HEAD in written
    for name, value in written.items():
        weights = table["coefficients"].get(name, [0.0] * 3)
        expected = reference[name] + sum(w * (m[name] - reference[name]) for w, m in zip(weights, members))
        torch.testing.assert_close(value.to(torch.float64), expected, rtol=1e-5, atol=1e-6)
    # the kept-tie members move the head: their weight on it is not idle
    head = table["coefficients"][HEAD]
    assert torch.equal(members[1][HEAD], members[1][EMBEDDINGS]) and torch.equal(members[2][HEAD], members[2][EMBEDDINGS])
    assert any(w != 0 for w in head[1:]), head


def test_a_lora_on_a_tied_head_is_refused_with_the_reason(families, tmp_path, monkeypatch):
    """PEFT merges a LoRA on a tied head into the one shared tensor (embeddings moved
    too); mergekit-fw refuses it before any maths, saying what to do instead."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pool = families["qwen2"]
    base = pool["base"]
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "lora_head"))
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    config = lora_config(tmp_path / "fw.yml", base, [tmp_path / "lora_head", pool["adapters"][0]], pool["calibration"],
                         iterations=2)
    result = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "puts a LoRA on lm_head, which the base ties to model.embed_tokens.weight" in result.output, result.output
    assert "modules_to_save" in result.output
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").rglob("fw_table.json"))
    from tests.conftest import subprocess_env

    done = subprocess.run(["mergekit-yaml", str(config), str(tmp_path / "yaml"), "--quiet"], capture_output=True,
                          text=True, env=subprocess_env(MERGEKIT_FW_CACHE=str(tmp_path / "cache")), timeout=600)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "puts a LoRA on lm_head, which the base ties to model.embed_tokens.weight" in done.stderr, done.stderr
    assert not (tmp_path / "yaml").exists()


@pytest.mark.slow
def test_an_untying_pool_started_from_mergekits_merge_is_that_merge_at_iteration_zero(saving_pools, tmp_path,
                                                                                       monkeypatch):
    """The initial merge (stock task arithmetic, run by mergekit) stores the head its
    inputs store; as a vertex its head moves by that head minus the embeddings."""
    from tests.paths import mergekit_fw_here, mergekit_yaml, write_config

    pool = saving_pools["qwen2"]
    models = [{"model": f"{pool['base']}+{adapter}"} for adapter in pool["adapters"]]
    ta = write_config(tmp_path / "ta.yml", {
        "merge_method": "task_arithmetic", "base_model": str(pool["base"]), "dtype": "float32",
        "models": [{**model, "parameters": {"weight": 0.3}} for model in models]})
    fw = write_config(tmp_path / "fw.yml", {
        "merge_method": "frank_wolfe", "base_model": str(pool["base"]), "models": models, "dtype": "float32",
        "parameters": {"calibration": str(pool["calibration"]), "init": str(ta), "epsilon": 1e9, "iterations": 1}})
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    mergekit_yaml(ta, tmp_path / "ta_out", tmp_path / "lora_cache")
    mergekit_fw_here(fw, tmp_path / "fast")  # stops before any step
    expected, got = tensors(tmp_path / "ta_out"), tensors(tmp_path / "fast")
    assert HEAD in expected and set(got) == set(expected)
    assert [name for name in expected if not torch.equal(got[name], expected[name])] == []
    assert json.loads((tmp_path / "fast" / "config.json").read_text())["tie_word_embeddings"] is False
