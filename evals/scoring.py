"""Held-out scores through lm-eval-harness, the client our users evaluate with, and
the normalised score the paper reports: merged / individual, averaged over tasks.

The individual score of a task is its own adapter (folded into the base) on that
task's test rows, computed once per pool and task and kept in the workspace.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Dict, Mapping, Sequence

from testbed.build import Pool
from testbed.data import lm_eval_name, metric
from testbed.tasks import BY_NAME

LOG = logging.getLogger(__name__)
BATCH_SIZE = 64


def test_scores(model_dir: Path, pool: Pool, tasks: Sequence[str]) -> Dict[str, float]:
    """lm-eval on the tasks' held-out rows: exact match (generation) or accuracy (choice)."""
    from mergekit_fw.evaluation import lm_eval_scores

    for name in ("lm_eval", "lm-eval", "lm_eval.api", "lm_eval.evaluator", "lm_eval.models"):
        logging.getLogger(name).setLevel(logging.WARNING)
    names = {lm_eval_name(BY_NAME[t]): t for t in tasks}
    metrics = {lm_eval_name(BY_NAME[t]): metric(BY_NAME[t]) for t in tasks}
    scores = lm_eval_scores(model_dir, list(names), pool.lm_eval_dir, metric=metrics, batch_size=BATCH_SIZE)
    return {names[k]: v for k, v in scores.items()}


def individual_scores(pool: Pool, tasks: Sequence[str], cache: Path) -> Dict[str, float]:
    """Each task's own adapter on its own test rows (cached per pool and task)."""
    from evals.methods import merged_adapter

    cache.mkdir(parents=True, exist_ok=True)
    out: Dict[str, float] = {}
    for task in tasks:
        path = cache / f"{task}.json"
        if not path.is_file():
            entry = pool.candidate(task)
            folder = cache / f"{task}.model"
            shutil.rmtree(folder, ignore_errors=True)
            model_dir = merged_adapter(pool.base, Path(entry["path"]), folder) if entry["kind"] == "lora" else Path(entry["path"])
            score = test_scores(model_dir, pool, [task])[task]
            shutil.rmtree(folder, ignore_errors=True)
            path.write_text(json.dumps({"task": task, "adapter": entry["name"], "score": score}))
        out[task] = json.loads(path.read_text())["score"]
    return out


def normalized(scores: Mapping[str, float], individual: Mapping[str, float]) -> float:
    """Mean over tasks of merged / individual, in points (100 = every adapter's own score).
    A task whose own adapter scores 0 has nothing to normalise by and is left out."""
    ratios = [scores[t] / individual[t] for t in scores if individual[t] > 0]
    return 100.0 * sum(ratios) / len(ratios) if ratios else float("nan")
