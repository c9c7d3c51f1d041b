"""Calibration data: task-tagged prompt/completion pairs, tokenised into batches.

The loss is taken on completion tokens only, and the objective is balanced over
tasks, so each batch carries the task of every row and the set knows how many
completion tokens each task has in total (the normaliser of its mean).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import torch

LOG = logging.getLogger(__name__)
IGNORE_INDEX = -100


class CalibrationError(ValueError):
    """The calibration file is missing, malformed or empty; names file and line."""


@dataclass(frozen=True)
class CalibrationExample:
    task: str
    prompt: str
    completion: str


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX outside completions
    task_index: torch.Tensor  # (B,)


@dataclass
class CalibrationSet:
    tasks: List[str]
    batches: List[CalibrationBatch]
    completion_tokens: torch.Tensor  # (n_tasks,) label tokens per task

    @property
    def num_examples(self) -> int:
        return sum(int(b.input_ids.shape[0]) for b in self.batches)


def read_jsonl(path: Path) -> List[CalibrationExample]:
    """Read and validate every line, so a bad file fails before any model loads."""
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    examples = []
    with path.open("r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CalibrationError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise CalibrationError(f"{path}:{number}: expected a JSON object")
            for key in ("task", "prompt", "completion"):
                if not isinstance(record.get(key), str):
                    raise CalibrationError(
                        f"{path}:{number}: field {key!r} must be a string "
                        f"(got {type(record.get(key)).__name__})"
                    )
            if not record["completion"]:
                raise CalibrationError(f"{path}:{number}: empty completion")
            examples.append(CalibrationExample(record["task"], record["prompt"], record["completion"]))
    if not examples:
        raise CalibrationError(f"{path}: no calibration examples")
    return examples


def select_per_task(
    examples: Sequence[CalibrationExample], samples_per_task: int
) -> "OrderedDict[str, List[CalibrationExample]]":
    """The first N examples of each task, tasks in order of first appearance."""
    by_task: "OrderedDict[str, List[CalibrationExample]]" = OrderedDict()
    for example in examples:
        bucket = by_task.setdefault(example.task, [])
        if len(bucket) < samples_per_task:
            bucket.append(example)
    for task, bucket in by_task.items():
        if len(bucket) < samples_per_task:
            LOG.warning("task %r has %d calibration samples (< %d asked)", task, len(bucket), samples_per_task)
    return by_task


def _encode(tokenizer, example: CalibrationExample, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt+completion and the number of prompt tokens.

    Prompt and completion are encoded separately so the boundary is exact; the
    prompt is cut from the left when the pair is too long, never the completion.
    """
    prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    if not completion_ids:
        raise CalibrationError(f"task {example.task!r}: completion {example.completion!r} has no tokens")
    completion_ids = completion_ids[: max_length - 1]
    keep = max(1, max_length - len(completion_ids))
    prompt_ids = prompt_ids[-keep:]
    return prompt_ids + completion_ids, len(prompt_ids)


def build_calibration(
    path: Path,
    tokenizer,
    *,
    samples_per_task: int,
    batch_size: int,
    max_length: int,
) -> CalibrationSet:
    by_task = select_per_task(read_jsonl(path), samples_per_task)
    tasks = list(by_task)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows = []
    for task_index, (task, examples) in enumerate(by_task.items()):
        for example in examples:
            ids, n_prompt = _encode(tokenizer, example, max_length)
            rows.append((ids, n_prompt, task_index))
    # Group similar lengths so padding wastes little compute; order is deterministic.
    rows.sort(key=lambda row: (len(row[0]), row[2]))
    completion_tokens = torch.zeros(len(tasks), dtype=torch.float64)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, n_prompt, task_index) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            completion_tokens[task_index] += len(ids) - n_prompt
        task_index = torch.tensor([t for _, _, t in chunk], dtype=torch.long)
        batches.append(CalibrationBatch(input_ids, attention, labels, task_index))
    LOG.info("calibration: %d examples over %d tasks (%s)", len(rows), len(tasks), ", ".join(tasks))
    return CalibrationSet(tasks=tasks, batches=batches, completion_tokens=completion_tokens)

