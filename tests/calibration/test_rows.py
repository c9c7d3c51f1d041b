"""Every error about a calibration row names the file and the line: bytes that are
not UTF-8, blank prompts and completions, chat rows that the objective cannot read."""

from __future__ import annotations

import json

import pytest

from mergekit_fw.calibration.rows import CalibrationError, read_jsonl
from tests.calibration.helpers import ANSWER, ROW, USER, write_rows


@pytest.mark.parametrize(("line", "fragment"), [
    (b'{"task": "reverse", "prompt": "caf\xe9", "completion": "x"}\n', "not UTF-8 text (byte 0xe9 at column 35)"),
    (b"\xff\xfe{}\n", "not UTF-8 text (byte 0xff at column 1)"),
    (json.dumps({**ROW, "prompt": "  \t "}).encode() + b"\n", "empty or whitespace-only prompt"),
    (json.dumps({**ROW, "prompt": ""}).encode() + b"\n", "empty or whitespace-only prompt"),
    (json.dumps({**ROW, "completion": " \n "}).encode() + b"\n", "empty or whitespace-only completion"),
    (json.dumps({**ROW, "task": " "}).encode() + b"\n", "empty task name"),
])
def test_a_bad_line_is_named_by_file_and_number(line, fragment, tmp_path):
    path = write_rows(tmp_path / "calib.jsonl", [ROW, b"\n", line, ROW])
    with pytest.raises(CalibrationError) as caught:
        read_jsonl(path)
    assert str(caught.value).startswith(f"{path}:3: "), caught.value
    assert fragment in str(caught.value)


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROW).encode() + b"\n")
    assert [e.task for e in read_jsonl(path)] == ["reverse"]


def test_rows_know_their_line(tmp_path):
    path = write_rows(tmp_path / "calib.jsonl", [ROW, b"\n", ROW])
    assert [e.where for e in read_jsonl(path)] == [f"{path}:1", f"{path}:3"]


@pytest.mark.parametrize(("row", "labelled", "fragment"), [
    ({"task": "t", "messages": [USER]}, True, "ends with a 'user' turn"),
    ({"task": "t", "messages": [USER, ANSWER, USER]}, True, "the last turn must be the assistant's"),
    ({"task": "t", "messages": []}, True, "'messages' must be a non-empty list"),
    ({"task": "t", "messages": "hi"}, True, "'messages' must be a non-empty list"),
    ({"task": "t", "messages": [USER, "hi"]}, True, "messages[1]: expected an object"),
    ({"task": "t", "messages": [{"role": "user"}, ANSWER]}, True, "messages[0]: 'content' must be a string"),
    ({"task": "t", "messages": [{"role": "user", "content": [{"type": "text"}]}, ANSWER]}, True, "list of parts"),
    ({"task": "t", "messages": [{"role": " ", "content": "x"}, ANSWER]}, True, "messages[0]: 'role' must be"),
    ({"task": "t", "messages": [USER, {"role": "assistant", "content": " "}]}, True, "empty or whitespace-only assistant"),
    ({"task": "t", "messages": [ANSWER]}, False, "no turn before the assistant's"),
    ({"task": "t", "messages": [USER, ANSWER], "prompt": "p"}, True, "either 'messages' or 'prompt'"),
])
def test_a_chat_row_the_objective_cannot_read_is_named(row, labelled, fragment, tmp_path):
    path = write_rows(tmp_path / "calib.jsonl", [ROW, row])
    with pytest.raises(CalibrationError) as caught:
        read_jsonl(path, labelled=labelled)
    assert str(caught.value).startswith(f"{path}:2"), caught.value
    assert fragment in str(caught.value)


def test_mixed_rows_are_read_in_order(tmp_path):
    chat = {"task": "reverse", "messages": [{"role": "system", "content": "be brief"}, USER, ANSWER]}
    path = write_rows(tmp_path / "calib.jsonl", [ROW, chat, {**ROW, "task": "sort"}])
    examples = read_jsonl(path)
    assert [e.is_chat for e in examples] == [False, True, False]
    assert [m.role for m in examples[1].messages] == ["system", "user", "assistant"]
    # under entropy a conversation may end with the user (the answer is the model's own)
    assert read_jsonl(write_rows(tmp_path / "u.jsonl", [{"task": "t", "messages": [USER]}]), labelled=False)[0].is_chat
