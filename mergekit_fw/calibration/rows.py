"""Calibration rows as users hold them: a JSONL of ``{"task", "prompt", "completion"}``
or ``{"task", "messages"}`` objects, in any mix.

Everything that can be checked without a tokenizer is checked here, line by line, so
a bad file fails before any model loads and every error names the file and the line.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)

ASSISTANT = "assistant"


class CalibrationError(ValueError):
    """The calibration file is missing, malformed or empty; names file and line."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class CalibrationExample:
    """One row: ``prompt`` and ``completion``, or a chat conversation in ``messages``
    (then ``prompt`` and ``completion`` are empty and the base's chat template renders it)."""

    task: str
    prompt: str
    completion: str
    where: str = ""  # "file:line", for errors about this row found after reading
    messages: tuple[Message, ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered text lines; bytes that are not UTF-8 are named by line and column
    (a byte-order mark on the first line is dropped, as editors on Windows write one)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise CalibrationError(
                    f"{path}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            yield number, line


def _messages(raw: Any, where: str, labelled: bool) -> tuple[Message, ...]:
    """The conversation, checked as far as it can be without the template: roles and
    contents are strings, and under cross-entropy the last turn is the assistant's
    (the tokens the objective counts); under entropy some turn is not the assistant's."""
    if not isinstance(raw, list) or not raw:
        raise CalibrationError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    messages = []
    for index, item in enumerate(raw):
        at = f"{where}: messages[{index}]"
        if not isinstance(item, dict):
            raise CalibrationError(f"{at}: expected an object with 'role' and 'content' (got {type(item).__name__})")
        role, content = item.get("role"), item.get("content")
        if not isinstance(role, str) or not role.strip():
            raise CalibrationError(f"{at}: 'role' must be a non-empty string (got {role!r})")
        if not isinstance(content, str):
            raise CalibrationError(
                f"{at}: 'content' must be a string (got {type(content).__name__}; "
                "content given as a list of parts, as for images, is not supported)"
            )
        if role == ASSISTANT and labelled and not content.strip():
            raise CalibrationError(f"{at}: empty or whitespace-only assistant turn (its tokens are what counts)")
        messages.append(Message(role, content))
    if labelled and messages[-1].role != ASSISTANT:
        raise CalibrationError(
            f"{where}: the conversation ends with a {messages[-1].role!r} turn; the cross-entropy objective "
            "counts the tokens of the assistant's answer, so the last turn must be the assistant's"
        )
    if not labelled and all(m.role == ASSISTANT for m in messages):
        raise CalibrationError(f"{where}: the conversation has no turn before the assistant's to read")
    return tuple(messages)


def _example(record: dict, where: str, labelled: bool) -> CalibrationExample:
    task = record.get("task")
    if not isinstance(task, str):
        raise CalibrationError(f"{where}: field 'task' must be a string (got {type(task).__name__})")
    if not task.strip():
        raise CalibrationError(f"{where}: empty task name")
    if "messages" in record:
        both = sorted({"prompt", "completion"} & set(record))
        if both:
            raise CalibrationError(
                f"{where}: a row holds either 'messages' or 'prompt' and 'completion', not both (found {both})"
            )
        return CalibrationExample(task, "", "", where, _messages(record["messages"], where, labelled))
    if not labelled:
        record.setdefault("completion", "")
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise CalibrationError(
                f"{where}: field {key!r} must be a string (got {type(record.get(key)).__name__}); "
                "a row holds 'prompt' and 'completion', or a chat conversation in 'messages'"
            )
    if not record["prompt"].strip():
        what = "the entropy objective reads prompts" if not labelled else "a completion needs a prompt to follow"
        raise CalibrationError(f"{where}: empty or whitespace-only prompt ({what})")
    if labelled and not record["completion"].strip():
        raise CalibrationError(f"{where}: empty or whitespace-only completion")
    return CalibrationExample(task, record["prompt"], record["completion"], where)


def read_jsonl(path: Path, *, labelled: bool = True) -> list[CalibrationExample]:
    """Read and validate every line, so a bad file fails before any model loads.

    Unlabelled data (the entropy objective) needs only ``task`` and ``prompt`` (or
    ``messages``)."""
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    examples = []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CalibrationError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise CalibrationError(f"{path}:{number}: expected a JSON object")
        examples.append(_example(record, f"{path}:{number}", labelled))
    if not examples:
        raise CalibrationError(f"{path}: no calibration examples")
    return examples


def select_per_task(
    examples: Sequence[CalibrationExample], samples_per_task: int, *, warn: bool = True
) -> OrderedDict[str, list[CalibrationExample]]:
    """The first N examples of each task, tasks in order of first appearance (a task
    with fewer is named in a warning, once: ``warn`` is off for early checks)."""
    by_task: OrderedDict[str, list[CalibrationExample]] = OrderedDict()
    for example in examples:
        bucket = by_task.setdefault(example.task, [])
        if len(bucket) < samples_per_task:
            bucket.append(example)
    for task, bucket in by_task.items():
        if warn and len(bucket) < samples_per_task:
            LOG.warning("task %r has %d calibration samples (< %d asked)", task, len(bucket), samples_per_task)
    return by_task
