"""Scores through lm-eval-harness, the harness users evaluate merges with."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Sequence

LOG = logging.getLogger(__name__)


def lm_eval_scores(
    model_dir: Path,
    tasks: Sequence[str],
    include_path: Path,
    *,
    metric: str = "exact_match",
    batch_size: int = 64,
    device: str = "cpu",
) -> Dict[str, float]:
    """``metric`` per task for an HF model folder, via ``lm_eval.simple_evaluate``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(include_path)),
        batch_size=batch_size,
        device=device,
    )
    scores = {}
    for task in tasks:
        row = results["results"][task]
        key = next(k for k in row if k.split(",")[0] == metric)
        scores[task] = float(row[key])
    return scores
