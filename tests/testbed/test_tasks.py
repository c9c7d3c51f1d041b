"""The evidence testbed's task catalogue and data: distinct skills, disjoint
splits, and task files that lm-eval itself loads and scores."""

from __future__ import annotations

import json
import random

from testbed.data import Sizes, calibration_file, lm_eval_name, write_task_data
from testbed.tasks import BY_NAME, SYMBOLS, TASKS, sequences, split_of, words

FAMILIES = {"string", "arithmetic", "lookup", "short", "choice"}


def test_catalogue_covers_twenty_distinct_skills_in_every_family():
    assert len(TASKS) >= 20 and len(BY_NAME) == len(TASKS)
    assert {task.family for task in TASKS} == FAMILIES
    probe = sequences(random.Random(0), "test", 300)
    answers = {task.name: [task.completion(seq) for seq in probe] for task in TASKS}
    for a in TASKS:
        for b in TASKS:
            if a.name < b.name and a.kind == b.kind == "generate":
                same = sum(x == y for x, y in zip(answers[a.name], answers[b.name])) / len(probe)
                assert same < 0.5, (a.name, b.name, same)


def test_choice_tasks_are_not_dominated_by_one_label():
    probe = sequences(random.Random(1), "test", 400)
    for task in TASKS:
        if task.kind != "choice":
            continue
        labels = [task.options(seq)[1] for seq in probe]
        most = max(labels.count(label) for label in set(labels)) / len(labels)
        assert len(set(labels)) >= 2 and most < 0.6, (task.name, most)


def test_every_answer_word_is_in_the_vocabulary():
    vocab = set(words())
    for task in TASKS:
        for seq in sequences(random.Random(2), "calib", 30):
            assert set(task.prompt(seq).split()) <= vocab
            assert set(task.completion(seq).split()) <= vocab


def test_splits_are_disjoint_and_data_is_deterministic(tmp_path):
    sizes = Sizes(train=40, calib=10, test=10)
    files = write_task_data(tmp_path / "a", ["reverse", "firstlow"], sizes, seed=3)
    again = write_task_data(tmp_path / "b", ["firstlow"], sizes, seed=3)  # another task set: same rows
    assert files["firstlow"].test.read_bytes() == again["firstlow"].test.read_bytes()
    seen = {}
    for split in ("train", "calib", "test"):
        rows = [json.loads(line) for line in getattr(files["reverse"], split).read_text().splitlines()]
        assert len(rows) == getattr(sizes, split)
        for r in rows:
            seq = tuple(r["prompt"].split()[1:-1])
            assert split_of(seq) == split and seen.setdefault(seq, split) == split
    calib = calibration_file(tmp_path / "calib.jsonl", files, ["reverse", "firstlow"], per_task=4)
    assert [json.loads(line)["task"] for line in calib.read_text().splitlines()] == ["reverse"] * 4 + ["firstlow"] * 4


def test_lm_eval_loads_the_task_files(tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    names = ["reverse", "addpairs", "whichmax", "countlow"]
    files = write_task_data(tmp_path, names, Sizes(train=4, calib=4, test=6), seed=0)
    manager = TaskManager(include_path=str(tmp_path / "lm_eval_tasks"))
    tasks = get_task_dict([lm_eval_name(BY_NAME[n]) for n in names], manager)
    for name in names:
        task = tasks[lm_eval_name(BY_NAME[name])]
        docs = list(task.test_docs())
        assert len(docs) == 6
        rows = [json.loads(line) for line in files[name].test.read_text().splitlines()]
        for doc, row in zip(docs, rows):
            assert task.doc_to_text(doc) == row["prompt"]
            if BY_NAME[name].kind == "choice":
                assert task.doc_to_choice(doc) == row["choices"]
                assert task.doc_to_target(doc) == row["label"]
                assert row["choices"][row["label"]] == row["completion"]
            else:
                assert task.doc_to_target(doc) == row["completion"]
    assert len(SYMBOLS) == 16
