"""Task-balanced calibration objectives.

loss = mean over tasks of (that task's mean per-position loss), so a task with
long answers does not dominate. The per-position weights are fixed by the whole
calibration set, which makes the loss a plain sum over batches: gradients can be
accumulated batch by batch (or process by process) and stay exact.

* ``cross_entropy``: the next-token loss at positions that predict completion
  tokens (labelled prompt/completion pairs).
* ``entropy``: the entropy of the model's next-token distribution (unlabelled
  prompts; AdaMerging's test-time surrogate) at the positions the calibration set
  marks: by default those that predict the answer. AdaMerging takes the entropy of a
  classifier's prediction; in a language model that prediction is the token after
  the prompt, while most prompt positions predict the next input token and say
  nothing about the task (measured in ``evals/results/entropy_positions.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergekit_fw.calibration.batches import IGNORE_INDEX, CalibrationBatch, CalibrationSet

OBJECTIVES = ("cross_entropy", "entropy")


def position_weights(calibration: CalibrationSet) -> torch.Tensor:
    """Weight of one counted position of each task: 1 / (n_tasks * positions of task)."""
    return 1.0 / (len(calibration.tasks) * calibration.counted_positions.clamp(min=1))


def batch_loss(logits: torch.Tensor, batch: CalibrationBatch, weights: torch.Tensor, objective: str) -> torch.Tensor:
    """This batch's additive share of the task-balanced objective."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    mask = batch.positions
    selected = logits[mask]  # (N, vocab): only counted positions
    if objective == "cross_entropy":
        per_position = F.cross_entropy(selected, batch.targets[mask], ignore_index=IGNORE_INDEX, reduction="none")
    elif objective == "entropy":
        log_p = F.log_softmax(selected, dim=-1)
        per_position = -(log_p.exp() * log_p).sum(dim=-1)
    else:
        raise ValueError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")
    return per_position.sum() * weights[batch.task].to(per_position.dtype)
