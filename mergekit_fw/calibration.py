"""Calibration data: task-tagged prompts (and completions), tokenised into batches.

Each batch marks the logit positions the objective counts: the positions that
predict completion tokens (cross-entropy, labelled data), or for the entropy of
unlabelled prompts the positions that predict the answer (the last prompt
position; more answer positions are decoded later, by the oracle, at the starting
point) or every prompt position. The objective is balanced over tasks, so the set
knows how many counted positions each task has (the normaliser of its mean).
Batches never mix tasks: per-task gradients (soft FW's task-wise top-k) are then
a by-product of accumulating batch by batch.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    where: str = ""  # "file:line", for errors about this row found after reading


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) next-token id at each counted position, IGNORE_INDEX elsewhere
    positions: torch.Tensor  # (B, T) bool, logit positions the objective counts
    task: int  # every row of a batch belongs to this task

    def to(self, device) -> CalibrationBatch:
        return CalibrationBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.targets.to(device),
            self.positions.to(device),
            self.task,
        )


@dataclass
class CalibrationSet:
    tasks: list[str]
    batches: list[CalibrationBatch]
    counted_positions: torch.Tensor  # (n_tasks,) positions the objective counts, per task
    objective: str = "cross_entropy"
    # entropy at answer positions: how many per row; beyond the first they are decoded
    # greedily by the oracle at the starting point (:meth:`Oracle.decode_answers`)
    answer_tokens: int = 1

    @property
    def num_examples(self) -> int:
        return sum(int(b.input_ids.shape[0]) for b in self.batches)


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


def read_jsonl(path: Path, *, labelled: bool = True) -> list[CalibrationExample]:
    """Read and validate every line, so a bad file fails before any model loads.

    Unlabelled data (the entropy objective) needs only ``task`` and ``prompt``.
    """
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
        if not labelled:
            record.setdefault("completion", "")
        for key in ("task", "prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise CalibrationError(
                    f"{path}:{number}: field {key!r} must be a string (got {type(record.get(key)).__name__})"
                )
        if not record["task"].strip():
            raise CalibrationError(f"{path}:{number}: empty task name")
        if not record["prompt"].strip():
            what = "the entropy objective reads prompts" if not labelled else "a completion needs a prompt to follow"
            raise CalibrationError(f"{path}:{number}: empty or whitespace-only prompt ({what})")
        if labelled and not record["completion"].strip():
            raise CalibrationError(f"{path}:{number}: empty or whitespace-only completion")
        examples.append(CalibrationExample(record["task"], record["prompt"], record["completion"], f"{path}:{number}"))
    if not examples:
        raise CalibrationError(f"{path}: no calibration examples")
    return examples


def select_per_task(
    examples: Sequence[CalibrationExample], samples_per_task: int
) -> OrderedDict[str, list[CalibrationExample]]:
    """The first N examples of each task, tasks in order of first appearance."""
    by_task: OrderedDict[str, list[CalibrationExample]] = OrderedDict()
    for example in examples:
        bucket = by_task.setdefault(example.task, [])
        if len(bucket) < samples_per_task:
            bucket.append(example)
    for task, bucket in by_task.items():
        if len(bucket) < samples_per_task:
            LOG.warning("task %r has %d calibration samples (< %d asked)", task, len(bucket), samples_per_task)
    return by_task


def _encode(tokenizer, example: CalibrationExample, max_length: int, labelled: bool) -> tuple[list[int], int] | None:
    """Token ids of prompt(+completion) and the number of prompt tokens; ``None`` for
    a row that ``max_length`` cuts away (its completion does not fit beside one
    prompt token: what the objective would count is not the row's answer).

    Prompt and completion are encoded separately so the boundary is exact; the
    prompt is cut from the left when the pair is too long, never the completion.
    """
    prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    if not prompt_ids:
        raise CalibrationError(f"{example.where}: prompt {example.prompt[:40]!r} has no tokens")
    if not labelled:
        prompt_ids = prompt_ids[-max_length:]
        return prompt_ids, len(prompt_ids)
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    if not completion_ids:
        raise CalibrationError(f"{example.where}: completion {example.completion[:40]!r} has no tokens")
    if len(completion_ids) > max_length - 1:
        return None
    prompt_ids = prompt_ids[-(max_length - len(completion_ids)) :]
    return prompt_ids + completion_ids, len(prompt_ids)


def _encoded_rows(
    tokenizer, task: str, examples: list[CalibrationExample], max_length: int, labelled: bool
) -> list[tuple[list[int], int]]:
    """A task's rows, those that ``max_length`` cuts away named and left out; a task
    with none left is an error naming its rows."""
    rows, cut = [], []
    for example in examples:
        row = _encode(tokenizer, example, max_length, labelled)
        if row is None:
            cut.append(example.where)
        else:
            rows.append(row)
    if cut:
        shown = ", ".join(cut[:3]) + (f" and {len(cut) - 3} more" if len(cut) > 3 else "")
        if not rows:
            raise CalibrationError(
                f"{shown}: every row of task {task!r} has a completion longer than max_length - 1 = "
                f"{max_length - 1} tokens, so none is left (raise max_length or shorten the completions)"
            )
        LOG.warning(
            "task %r: %d of %d rows left out, their completions longer than max_length - 1 = %d tokens: %s",
            task,
            len(cut),
            len(examples),
            max_length - 1,
            shown,
        )
    return rows


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id, else its end of sequence, else 0 (padding is masked)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def build_calibration(
    path: Path,
    tokenizer,
    *,
    samples_per_task: int,
    batch_size: int,
    max_length: int,
    objective: str = "cross_entropy",
    entropy_positions: str = "answer",
    answer_tokens: int = 1,
) -> CalibrationSet:
    """``entropy_positions``, ``answer_tokens``: see the settings of the same names.
    Every row counts exactly ``answer_tokens`` answer positions, known before any
    decoding, so the task weights of the objective are fixed here."""
    labelled = objective == "cross_entropy"
    answer = not labelled and entropy_positions == "answer"
    if not labelled and entropy_positions not in ("answer", "prompt"):
        raise ValueError(f"unknown entropy_positions {entropy_positions!r} (known: answer, prompt)")
    by_task = select_per_task(read_jsonl(path, labelled=labelled), samples_per_task)
    tasks = list(by_task)
    pad_id = pad_token_id(tokenizer)
    counted = torch.zeros(len(tasks), dtype=torch.float64)
    batches = []
    for task_index, examples in enumerate(by_task.values()):
        rows = _encoded_rows(tokenizer, tasks[task_index], examples, max_length, labelled)
        # Similar lengths together so padding wastes little compute; deterministic order.
        rows.sort(key=lambda row: len(row[0]))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            targets = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            positions = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, (ids, n_prompt) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                if labelled:  # position t predicts token t + 1 of the completion
                    targets[row, n_prompt - 1 : len(ids) - 1] = torch.tensor(ids[n_prompt:])
                    positions[row, n_prompt - 1 : len(ids) - 1] = True
                elif answer:  # the position after the prompt's last token predicts the answer
                    positions[row, n_prompt - 1] = True
                else:
                    positions[row, :n_prompt] = True
            counted[task_index] += float(positions.sum()) * (answer_tokens if answer else 1)
            batches.append(CalibrationBatch(input_ids, attention, targets, positions, task_index))
    LOG.info(
        "calibration: %d examples over %d tasks (%s)", sum(map(len, by_task.values())), len(tasks), ", ".join(tasks)
    )
    return CalibrationSet(
        tasks=tasks,
        batches=batches,
        counted_positions=counted,
        objective=objective,
        answer_tokens=answer_tokens if answer else 1,
    )


def with_answers(batch: CalibrationBatch, answers: torch.Tensor, pad_id: int) -> CalibrationBatch:
    """The batch with each row's decoded answer tokens appended after its prompt, and
    the positions that predict them counted beside the last prompt position.

    ``answers``: (B, k - 1) token ids. Rows are right-padded to different lengths, so
    each row's answer starts where its own prompt ends."""
    rows, extra = answers.shape
    lengths = batch.attention_mask.sum(dim=1)
    width = int(lengths.max()) + extra
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.bool)
    for row in range(rows):
        n = int(lengths[row])
        input_ids[row, :n] = batch.input_ids[row, :n]
        input_ids[row, n : n + extra] = answers[row]
        attention[row, : n + extra] = 1
        positions[row, n - 1 : n + extra] = True
    targets = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    return CalibrationBatch(input_ids, attention, targets, positions, batch.task)
