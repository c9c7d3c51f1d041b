"""Fuzzing the two things users hand us by hand: the calibration JSONL (prompt and
completion rows, chat rows, and what is neither) and the
``parameters:`` block. Whatever comes in, the answer is a valid result or our own
error naming the file (and line) or the field; never a crash from deeper down."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mergekit_fw.calibration.rows import CalibrationError, read_jsonl
from mergekit_fw.config import (
    ConfigError,
    FrankWolfeParameters,
    parse_parameters,
    shown_key,
)

_text = st.text(max_size=12)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), _text)
_turn = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", ""]), "content": _text}),
    st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), _scalar, max_size=3),
    _scalar,
)
_messages = st.one_of(st.lists(_turn, max_size=4), _scalar)
_record = st.dictionaries(
    st.sampled_from(["task", "prompt", "completion", "extra", "messages"]), st.one_of(_scalar, _messages), max_size=4
)
_line = st.one_of(
    _record.map(json.dumps),
    st.fixed_dictionaries({"task": _text, "prompt": _text, "completion": _text}).map(json.dumps),
    st.fixed_dictionaries({"task": _text, "messages": _messages}).map(json.dumps),
    st.lists(_scalar, max_size=3).map(json.dumps),
    _text,  # not JSON at all, or blank
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_line, max_size=8), labelled=st.booleans())
def test_calibration_reader_accepts_or_names_the_line(lines, labelled):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "calib.jsonl"
        path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines) + "\n", encoding="utf-8")
        try:
            examples = read_jsonl(path, labelled=labelled)
        except CalibrationError as error:
            message = str(error)
            assert message.startswith(str(path))
            rest = message[len(str(path)):]
            if rest.startswith(":") and rest[1:2].isdigit():
                number = int(rest[1:].split(":")[0])
                assert 1 <= number <= len(lines)
                assert lines[number - 1].strip()  # a blank line is never the culprit
            return
        assert examples
        for example in examples:
            assert isinstance(example.task, str) and isinstance(example.prompt, str)
            if example.is_chat:  # a conversation the objective can read
                roles = [m.role for m in example.messages]
                assert roles[-1] == "assistant" if labelled else set(roles) != {"assistant"}
                assert all(isinstance(m.content, str) for m in example.messages)
            else:
                assert example.completion if labelled else example.prompt


_names = list(FrankWolfeParameters.model_fields)
_keys = st.one_of(st.sampled_from(_names), _text)
_values = st.one_of(_scalar, st.sampled_from(["hard", "soft", "layer", "task", "ties", "convex", "fixed", "base"]),
                    st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(raw=st.dictionaries(_keys, _values, max_size=6), calibration=st.booleans())
def test_parameters_validate_or_name_the_field(raw, calibration):
    if calibration:
        raw.setdefault("calibration", "calib.jsonl")
    try:
        params = parse_parameters(raw, source="fw.yml")
    except ConfigError as error:
        message = str(error)
        assert message.startswith("fw.yml: parameters.")
        assert any(f"parameters.{shown_key(key)}" in message for key in [*raw, *_names]), message
        return
    assert isinstance(params, FrankWolfeParameters)
    assert set(raw) <= set(_names)
    again = parse_parameters(params.model_dump(exclude_unset=True), source="fw.yml")
    assert again == params  # what validated is stable when round-tripped


# --- adapters: config and tensors mutated together -------------------------------------

_module_names = st.sampled_from(["q_proj", "v_proj", "k_proj", "o_proj", "down_proj", "up_proj", "lm_head",
                                 "embed_tokens", "self_attn", r".*\.q_proj", r".*", "layers", "(", "x"])
_config_values = {
    "r": st.one_of(st.integers(-1, 9), st.just("4"), st.none(), st.floats(0, 8)),
    "lora_alpha": st.one_of(st.integers(-8, 32), st.floats(allow_nan=True), st.just("16"), st.booleans()),
    "rank_pattern": st.dictionaries(_module_names, st.one_of(st.integers(0, 8), st.just(2.5)), max_size=2),
    "alpha_pattern": st.dictionaries(_module_names, st.one_of(st.integers(0, 16), st.floats(0, 9), st.just("x")),
                                     max_size=2),
    "target_modules": st.one_of(st.sampled_from([["q_proj", "v_proj"], ["v_proj", "q_proj", "k_proj"],
                                                 r".*\.(q|v)_proj", "all-linear"]),
                                st.lists(_module_names, max_size=3), _module_names, st.none(), st.just(7)),
    "exclude_modules": st.one_of(st.none(), st.lists(_module_names, max_size=2), _module_names),
    "layers_to_transform": st.one_of(st.none(), st.integers(0, 2), st.lists(st.integers(0, 2), max_size=2),
                                     st.just("0")),
    "layers_pattern": st.one_of(st.none(), st.sampled_from(["layers", "blocks", "h"]), st.just([]),
                                st.just(["layers", "("])),
    "use_rslora": st.one_of(st.booleans(), st.just("yes")),
    "fan_in_fan_out": st.booleans(),
    "bias": st.sampled_from(["none", "all", "lora_only", "some"]),
    "use_dora": st.booleans(),
    "modules_to_save": st.one_of(st.none(), st.lists(st.sampled_from(["lm_head", "q_proj", "embed_tokens", "("]),
                                                     max_size=1)),
    "init_lora_weights": st.sampled_from([True, False, "gaussian"]),
}
_config_changes = st.lists(st.sampled_from(sorted(_config_values)), max_size=2, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({key: _config_values[key] for key in keys}))
_tensor_edits = st.sampled_from(["none", "none", "none", "drop_B", "transpose_A", "lower_rank", "extra_key", "nan", "half",
                                 "scale", "bias_key"])


def _edit_tensors(tensors: dict, edit: str, key_A: str) -> None:
    import torch

    key_B = key_A.replace("lora_A", "lora_B")
    if edit == "drop_B":
        del tensors[key_B]
    elif edit == "transpose_A":
        tensors[key_A] = tensors[key_A].T.contiguous()
    elif edit == "lower_rank":
        tensors[key_A], tensors[key_B] = tensors[key_A][:-1].clone(), tensors[key_B][:, :-1].clone()
    elif edit == "extra_key":
        tensors["base_model.model.model.layers.0.mlp.gate_proj.lora_C.weight"] = torch.zeros(2, 2)
    elif edit == "nan":
        tensors[key_B] = tensors[key_B].clone()
        tensors[key_B][0, 0] = float("nan")
    elif edit == "half":
        tensors.update({k: v.half() for k, v in tensors.items()})
    elif edit == "scale":
        tensors[key_B] = tensors[key_B] * 1000
    elif edit == "bias_key":
        tensors[key_A.replace("lora_A.weight", "bias")] = torch.zeros(16)


def _peft_merge_deltas(base_dir: Path, adapter: Path):
    """PEFT's merge_and_unload of the adapter: the changed tensors' deltas, or the
    error (or the loading warning) with which PEFT refuses or half-loads it."""
    import warnings

    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(base_dir))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    except Exception as error:  # noqa: BLE001 - whatever PEFT raises, it refused
        return None, f"{type(error).__name__}: {error}"
    half_loaded = [str(w.message) for w in caught if re.search(r"missing adapter keys|unexpected keys", str(w.message))]
    deltas = {k: merged[k].double() - before[k].double() for k in before if not torch.equal(merged[k], before[k])}
    return deltas, "; ".join(half_loaded)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(changes=_config_changes, edit=_tensor_edits,
       module=st.sampled_from(["q_proj", "v_proj"]), layer=st.sampled_from([0, 1]))
def test_an_adapter_merges_as_peft_does_or_is_refused_by_name(changes, edit, module, layer, random_pool):
    """Any mutation of adapter_config.json and of the tensors: our pool reads exactly
    PEFT's merge_and_unload deltas, or refuses with an error naming the adapter's file;
    never a traceback, never a silent difference (nor a merge of what PEFT refuses)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mergekit_fw.pool.references import CandidateSpec, ModelSource, PoolError, PoolSpec
    from mergekit_fw.pool.validate import validated_pool

    with tempfile.TemporaryDirectory() as work:
        adapter = Path(shutil.copytree(random_pool["adapters"][0], Path(work) / "lora"))
        config_file, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
        config = json.loads(config_file.read_text())
        config.update(changes)
        config_file.write_text(json.dumps(config))
        tensors = load_file(str(weights))
        _edit_tensors(tensors, edit, f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_A.weight")
        save_file(tensors, str(weights), metadata={"format": "pt"})

        base = ModelSource(str(random_pool["base"]))
        spec = PoolSpec(base=base, candidates=(CandidateSpec("lora0", base, ModelSource(str(adapter))),))
        try:
            pool, _ = validated_pool(spec)
        except PoolError as error:
            assert str(error).startswith(f"candidate lora0: {adapter}"), error
            event("refused")
            return
        event("merged")
        ours = pool.candidates[0]
        peft, problem = _peft_merge_deltas(random_pool["base"], adapter)
        assert peft is not None and not problem, f"we merged an adapter PEFT refuses or half-loads: {problem}"
        base_tensors = load_file(str(random_pool["base"] / "model.safetensors"))
        assert set(ours.tensor_names()) >= set(peft), (sorted(peft), ours.tensor_names())
        for tensor in ours.tensor_names():
            delta = ours.delta(tensor, base_tensors[tensor]).double()
            expected = peft.get(tensor, torch.zeros_like(delta))
            torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{tensor}: {m}")
