"""Calibration rows tokenised into task-tagged batches.

Each batch marks the logit positions the objective counts: the positions that
predict answer tokens (a completion, or assistant turns of a chat row; cross-entropy,
labelled data), or for the entropy of
unlabelled prompts the positions that predict the answer (the last prompt
position; more answer positions are decoded later, by the oracle, at the starting
point) or every prompt position. The objective is balanced over tasks, so the set
knows how many counted positions each task has (the normaliser of its mean).
Batches never mix tasks: per-task gradients (soft FW's task-wise top-k) are then
a by-product of accumulating batch by batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_fw.calibration.chat import AssistantTurns, EncodedRow, encode_chat
from mergekit_fw.calibration.rows import CalibrationError, CalibrationExample, read_jsonl, select_per_task

LOG = logging.getLogger(__name__)
IGNORE_INDEX = -100


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


def _prompt_completion(tokenizer, example: CalibrationExample, labelled: bool) -> EncodedRow:
    """Prompt and completion are encoded separately, so the boundary is exact."""
    prompt_ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
    if not prompt_ids:
        raise CalibrationError(f"{example.where}: prompt {example.prompt[:40]!r} has no tokens")
    if not labelled:
        return EncodedRow(prompt_ids, len(prompt_ids))
    completion_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    if not completion_ids:
        raise CalibrationError(f"{example.where}: completion {example.completion[:40]!r} has no tokens")
    ids = prompt_ids + completion_ids
    return EncodedRow(ids, len(prompt_ids), ((len(prompt_ids), len(ids)),))


def fit(row: EncodedRow, max_length: int) -> EncodedRow | None:
    """The row cut from the left to ``max_length`` tokens, never inside its answer:
    counted ranges that the cut reaches (or leaves without a position to predict
    their first token) are dropped, and a row whose answer they include is ``None``
    (what the objective would count is not the row's answer)."""
    cut = len(row.ids) - max_length
    if cut <= 0:
        return row
    if not row.counted:  # an unlabelled prompt keeps its end, which predicts the answer
        return EncodedRow(row.ids[cut:], row.answer_start - cut)
    kept = tuple((start - cut, end - cut) for start, end in row.counted if start - cut >= 1)
    if not kept or kept[-1] != (row.counted[-1][0] - cut, row.counted[-1][1] - cut):
        return None
    return EncodedRow(row.ids[cut:], row.answer_start - cut, kept)


def encode(
    tokenizer,
    example: CalibrationExample,
    max_length: int,
    labelled: bool,
    assistant_turns: AssistantTurns = "last",
) -> EncodedRow | None:
    """One row's tokens and counted ranges, fitted to ``max_length``; ``None`` for a
    row that ``max_length`` cuts away."""
    if example.is_chat:
        row = encode_chat(tokenizer, example, labelled=labelled, assistant_turns=assistant_turns)
    else:
        row = _prompt_completion(tokenizer, example, labelled)
    return fit(row, max_length)


def _encoded_rows(
    tokenizer,
    task: str,
    examples: list[CalibrationExample],
    max_length: int,
    labelled: bool,
    assistant_turns: AssistantTurns,
) -> list[EncodedRow]:
    """A task's rows, those that ``max_length`` cuts away named and left out; a task
    with none left is an error naming its rows."""
    rows, cut = [], []
    for example in examples:
        row = encode(tokenizer, example, max_length, labelled, assistant_turns)
        if row is None:
            cut.append(example.where)
        else:
            rows.append(row)
    if cut:
        shown = ", ".join(cut[:3]) + (f" and {len(cut) - 3} more" if len(cut) > 3 else "")
        if not rows:
            raise CalibrationError(
                f"{shown}: every row of task {task!r} has an answer longer than max_length - 1 = "
                f"{max_length - 1} tokens, so none is left (raise max_length or shorten the answers)"
            )
        LOG.warning(
            "task %r: %d of %d rows left out, their answers longer than max_length - 1 = %d tokens: %s",
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
    assistant_turns: AssistantTurns = "last",
) -> CalibrationSet:
    """``entropy_positions``, ``answer_tokens``, ``assistant_turns``: see the settings
    of the same names. Every row counts exactly ``answer_tokens`` answer positions,
    known before any decoding, so the task weights of the objective are fixed here."""
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
        rows = _encoded_rows(tokenizer, tasks[task_index], examples, max_length, labelled, assistant_turns)
        # Similar lengths together so padding wastes little compute; deterministic order.
        rows.sort(key=lambda row: len(row.ids))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(row.ids) for row in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            targets = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            positions = torch.zeros((len(chunk), width), dtype=torch.bool)
            for index, row in enumerate(chunk):
                input_ids[index, : len(row.ids)] = torch.tensor(row.ids)
                attention[index, : len(row.ids)] = 1
                if labelled:  # position t predicts token t + 1 of an answer
                    for first, end in row.counted:
                        targets[index, first - 1 : end - 1] = torch.tensor(row.ids[first:end])
                        positions[index, first - 1 : end - 1] = True
                elif answer:  # the position after the prompt's last token predicts the answer
                    positions[index, row.answer_start - 1] = True
                else:
                    positions[index, : row.answer_start] = True
            counted[task_index] += float(positions.sum()) * (answer_tokens if answer else 1)
            batches.append(CalibrationBatch(input_ids, attention, targets, positions, task_index))
    chats = sum(example.is_chat for bucket in by_task.values() for example in bucket)
    LOG.info(
        "calibration: %d examples (%d chat conversations) over %d tasks (%s)",
        sum(map(len, by_task.values())),
        chats,
        len(tasks),
        ", ".join(tasks),
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
