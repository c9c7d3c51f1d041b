"""Rows into batches: rows that ``max_length`` cuts away are named by file and line,
a prompt is cut from the left, never an answer; chat rows count their assistant turns."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mergekit_fw.calibration.batches import build_calibration
from mergekit_fw.calibration.rows import CalibrationError
from tests.calibration.helpers import ROW, write_rows


@pytest.fixture(scope="module")
def tokenizer(random_pool):
    return AutoTokenizer.from_pretrained(str(random_pool["base"]))


def _build(path: Path, tokenizer, max_length: int):
    return build_calibration(path, tokenizer, samples_per_task=10, batch_size=4, max_length=max_length)


def test_a_task_cut_away_by_max_length_names_its_rows(tokenizer, tmp_path):
    long = {"task": "sort", "prompt": "sort a b", "completion": " ".join(["a"] * 20)}
    path = write_rows(tmp_path / "calib.jsonl", [ROW, long, long])
    with pytest.raises(CalibrationError) as caught:
        _build(path, tokenizer, max_length=12)
    message = str(caught.value)
    assert message.startswith(f"{path}:2, {path}:3: every row of task 'sort'"), message
    assert "max_length - 1 = 11" in message
    assert len(_build(path, tokenizer, max_length=64).tasks) == 2  # they fit a longer window


def test_some_rows_cut_away_are_named_and_left_out(tokenizer, tmp_path, caplog):
    long = {**ROW, "completion": " ".join(["a"] * 20)}
    path = write_rows(tmp_path / "calib.jsonl", [ROW, long, ROW])
    with caplog.at_level(logging.WARNING, logger="mergekit_fw.calibration"):
        calibration = _build(path, tokenizer, max_length=12)
    assert calibration.num_examples == 2
    assert "1 of 3 rows left out" in caplog.text and f"{path}:2" in caplog.text


def test_a_prompt_cut_from_the_left_keeps_the_whole_completion(tokenizer, tmp_path):
    path = write_rows(tmp_path / "calib.jsonl", [{**ROW, "prompt": " ".join(["b"] * 40)}])
    calibration = _build(path, tokenizer, max_length=12)
    batch = calibration.batches[0]
    completion = tokenizer(ROW["completion"], add_special_tokens=False)["input_ids"]
    assert batch.input_ids.shape[1] == 12
    assert batch.input_ids[0, -len(completion):].tolist() == completion
    assert int(batch.positions.sum()) == len(completion)
