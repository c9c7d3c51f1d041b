"""Fuzzing the two things users hand us by hand: the calibration JSONL and the
``parameters:`` block. Whatever comes in, the answer is a valid result or our own
error naming the file (and line) or the field; never a crash from deeper down."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_fw.calibration import CalibrationError, read_jsonl
from mergekit_fw.config import (
    ConfigError,
    FrankWolfeParameters,
    parse_parameters,
    shown_key,
)

_text = st.text(max_size=12)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), _text)
_record = st.dictionaries(st.sampled_from(["task", "prompt", "completion", "extra"]), _scalar, max_size=4)
_line = st.one_of(
    _record.map(json.dumps),
    st.fixed_dictionaries({"task": _text, "prompt": _text, "completion": _text}).map(json.dumps),
    st.lists(_scalar, max_size=3).map(json.dumps),
    _text,  # not JSON at all, or blank
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
