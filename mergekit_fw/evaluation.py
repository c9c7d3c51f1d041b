"""Scores through lm-eval-harness, the harness users evaluate merges with."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

LOG = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str):
    """lm-eval's task index (it scans every bundled task: seconds), built once per folder."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def lm_eval_scores(
    model_dir: Path,
    tasks: Sequence[str],
    include_path: Path,
    *,
    metric: str | Mapping[str, str] = "exact_match",
    batch_size: int = 64,
    device: str = "cpu",
    peft: Path | None = None,
) -> dict[str, float]:
    """``metric`` per task for an HF model folder, via ``lm_eval.simple_evaluate``; one
    call for every task, so the model is loaded once. ``metric``: one name for every
    task, or a name per task (generation tasks report exact match, multiple-choice
    ones accuracy). ``peft``: an adapter folder loaded on ``model_dir`` (lm-eval's own
    ``peft=`` model argument)."""
    import lm_eval

    adapter = f",peft={peft}" if peft is not None else ""
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32{adapter}",
        tasks=list(tasks),
        task_manager=task_manager(str(include_path)),
        batch_size=batch_size,
        device=device,
    )
    scores = {}
    for task in tasks:
        row = results["results"][task]
        wanted = metric if isinstance(metric, str) else metric[task]
        key = next(k for k in row if k.split(",")[0] == wanted)
        scores[task] = float(row[key])
    return scores
