"""Every error about a calibration file names the file and the line: bytes that are
not UTF-8, blank prompts and completions, and rows that ``max_length`` cuts away."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mergekit_fw.calibration import CalibrationError, build_calibration, read_jsonl


def _write(path: Path, rows: list[dict | bytes]) -> Path:
    path.write_bytes(b"".join(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n" for row in rows))
    return path


ROW = {"task": "reverse", "prompt": "reverse a b c", "completion": "= c b a"}


@pytest.mark.parametrize(("line", "fragment"), [
    (b'{"task": "reverse", "prompt": "caf\xe9", "completion": "x"}\n', "not UTF-8 text (byte 0xe9 at column 35)"),
    (b"\xff\xfe{}\n", "not UTF-8 text (byte 0xff at column 1)"),
    (json.dumps({**ROW, "prompt": "  \t "}).encode() + b"\n", "empty or whitespace-only prompt"),
    (json.dumps({**ROW, "prompt": ""}).encode() + b"\n", "empty or whitespace-only prompt"),
    (json.dumps({**ROW, "completion": " \n "}).encode() + b"\n", "empty or whitespace-only completion"),
    (json.dumps({**ROW, "task": " "}).encode() + b"\n", "empty task name"),
])
def test_a_bad_line_is_named_by_file_and_number(line, fragment, tmp_path):
    path = _write(tmp_path / "calib.jsonl", [ROW, b"\n", line, ROW])
    with pytest.raises(CalibrationError) as caught:
        read_jsonl(path)
    assert str(caught.value).startswith(f"{path}:3: "), caught.value
    assert fragment in str(caught.value)


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROW).encode() + b"\n")
    assert [e.task for e in read_jsonl(path)] == ["reverse"]


def test_rows_know_their_line(tmp_path):
    path = _write(tmp_path / "calib.jsonl", [ROW, b"\n", ROW])
    assert [e.where for e in read_jsonl(path)] == [f"{path}:1", f"{path}:3"]


@pytest.fixture(scope="module")
def tokenizer(random_pool):
    return AutoTokenizer.from_pretrained(str(random_pool["base"]))


def _build(path: Path, tokenizer, max_length: int):
    return build_calibration(path, tokenizer, samples_per_task=10, batch_size=4, max_length=max_length)


def test_a_task_cut_away_by_max_length_names_its_rows(tokenizer, tmp_path):
    long = {"task": "sort", "prompt": "sort a b", "completion": " ".join(["a"] * 20)}
    path = _write(tmp_path / "calib.jsonl", [ROW, long, long])
    with pytest.raises(CalibrationError) as caught:
        _build(path, tokenizer, max_length=12)
    message = str(caught.value)
    assert message.startswith(f"{path}:2, {path}:3: every row of task 'sort'"), message
    assert "max_length - 1 = 11" in message
    assert len(_build(path, tokenizer, max_length=64).tasks) == 2  # they fit a longer window


def test_some_rows_cut_away_are_named_and_left_out(tokenizer, tmp_path, caplog):
    long = {**ROW, "completion": " ".join(["a"] * 20)}
    path = _write(tmp_path / "calib.jsonl", [ROW, long, ROW])
    with caplog.at_level(logging.WARNING, logger="mergekit_fw.calibration"):
        calibration = _build(path, tokenizer, max_length=12)
    assert calibration.num_examples == 2
    assert "1 of 3 rows left out" in caplog.text and f"{path}:2" in caplog.text


def test_a_prompt_cut_from_the_left_keeps_the_whole_completion(tokenizer, tmp_path):
    path = _write(tmp_path / "calib.jsonl", [{**ROW, "prompt": " ".join(["b"] * 40)}])
    calibration = _build(path, tokenizer, max_length=12)
    batch = calibration.batches[0]
    completion = tokenizer(ROW["completion"], add_special_tokens=False)["input_ids"]
    assert batch.input_ids.shape[1] == 12
    assert batch.input_ids[0, -len(completion):].tolist() == completion
    assert int(batch.positions.sum()) == len(completion)
