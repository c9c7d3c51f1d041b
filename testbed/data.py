"""Data files of the testbed: train / calibration / held-out test JSONL per task,
and one lm-eval task YAML per task (generation + exact match, or multiple choice
by log-likelihood), all deterministic for a seed.

Rows are ``{"task", "prompt", "completion"}`` (what ``mergekit-fw``'s calibration
reader takes) plus, for choice tasks, ``choices`` and the gold ``label`` index that
lm-eval's multiple-choice tasks read.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from testbed.tasks import BY_NAME, Task, sequences

PREFIX = "fwtb_"  # lm-eval task names: fwtb_<task>

LM_EVAL_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
target_delimiter: " "
generation_kwargs:
  until: []
  max_gen_toks: {tokens}
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "^\\\\s*(.*?)\\\\s*$"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


LM_EVAL_CHOICE_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_jsonl(path: Path, rows: List[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def read_rows(path: Path, limit: Optional[int] = None) -> List[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


@dataclass(frozen=True)
class Sizes:
    """Rows per task and split."""

    train: int = 400
    calib: int = 100
    test: int = 100


def row(task: Task, seq: Sequence[str]) -> dict:
    out = {"task": task.name, "prompt": task.prompt(seq), "completion": task.completion(seq)}
    if task.options is not None:
        choices, gold = task.options(seq)
        out.update({"choices": choices, "label": gold})
    return out


def metric(task: Task) -> str:
    """The lm-eval metric the task's YAML reports."""
    return "acc" if task.kind == "choice" else "exact_match"


def lm_eval_name(task: Task) -> str:
    return PREFIX + task.name


@dataclass
class TaskFiles:
    train: Path
    calib: Path
    test: Path
    lm_eval_yaml: Path


def write_task_data(root: Path, tasks: Sequence[str], sizes: Sizes, seed: int) -> Dict[str, TaskFiles]:
    """Every split of every task, and its lm-eval YAML under ``root/lm_eval_tasks``.

    Each task draws from its own generator (seeded by the run seed and the task's
    name), so adding a task never changes another task's rows."""
    data, yamls = root / "data", root / "lm_eval_tasks"
    data.mkdir(parents=True, exist_ok=True)
    yamls.mkdir(parents=True, exist_ok=True)
    out: Dict[str, TaskFiles] = {}
    for name in tasks:
        task = BY_NAME[name]
        rng = random.Random(f"{seed}:{name}")
        files = {}
        for split, n in (("train", sizes.train), ("calib", sizes.calib), ("test", sizes.test)):
            path = data / f"{name}.{split}.jsonl"
            write_jsonl(path, [row(task, seq) for seq in sequences(rng, split, n)])
            files[split] = path
        yaml_path = yamls / f"{lm_eval_name(task)}.yaml"
        template = LM_EVAL_CHOICE_TASK if task.kind == "choice" else LM_EVAL_TASK
        yaml_path.write_text(template.format(
            name=lm_eval_name(task), data=json.dumps(str(files["test"].resolve())), tokens=task.answer_tokens()
        ))
        out[name] = TaskFiles(files["train"], files["calib"], files["test"], yaml_path)
    return out


def calibration_file(path: Path, files: Dict[str, TaskFiles], asked: Sequence[str], per_task: int) -> Path:
    """The asked tasks' first ``per_task`` calibration rows, in one JSONL."""
    rows: List[dict] = []
    for name in asked:
        with files[name].calib.open(encoding="utf-8") as handle:
            rows.extend(json.loads(line) for line, _ in zip(handle, range(per_task)))
    write_jsonl(path, rows)
    return path
