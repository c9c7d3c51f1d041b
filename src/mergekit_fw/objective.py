"""Task-balanced calibration objectives.

loss = mean over tasks of (that task's mean completion-token loss), so a task with
long answers does not dominate. The per-token weights are fixed by the whole
calibration set, which makes the loss a plain sum over batches: gradients can be
accumulated batch by batch (or process by process) and stay exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergekit_fw.calibration import IGNORE_INDEX, CalibrationBatch, CalibrationSet


def token_weights(calibration: CalibrationSet) -> torch.Tensor:
    """Weight of one completion token of each task: 1 / (n_tasks * tokens of task)."""
    return 1.0 / (len(calibration.tasks) * calibration.completion_tokens.clamp(min=1))


def batch_cross_entropy(
    logits: torch.Tensor, batch: CalibrationBatch, weights: torch.Tensor
) -> torch.Tensor:
    """This batch's additive share of the task-balanced cross-entropy."""
    shift_logits = logits[:, :-1, :]
    if shift_logits.dtype in (torch.float16, torch.bfloat16):
        shift_logits = shift_logits.float()
    shift_labels = batch.labels[:, 1:]
    per_token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)
    row_weight = weights.to(per_token.dtype)[batch.task_index].unsqueeze(1)
    mask = (shift_labels != IGNORE_INDEX).to(per_token.dtype)
    return (per_token * mask * row_weight).sum()
