"""``mergekit-fw calibration``: rows from Hugging Face datasets on disk (save_to_disk
folders, parquet, csv, json), sampled with a seed, mapped by columns or templates,
written atomically; every problem is one line naming the task and the source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_fw.calibration.rows import read_jsonl
from mergekit_fw.calibration.sources import parse_task
from mergekit_fw.cli import main

QUESTIONS = [{"question": f"reverse {' '.join('abcdef'[:1 + i % 5])}", "answer": " ".join(reversed('abcdef'[:1 + i % 5])),
              "label": i} for i in range(30)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("datasets")
    rows = [dict(row, answer="" if row["label"] == 7 else row["answer"]) for row in QUESTIONS]  # one without answer
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(QUESTIONS[:5])}).save_to_disk(str(root / "qa"))
    chats = [{"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}],
              "conversations": [{"from": "human", "value": row["question"]}, {"from": "gpt", "value": row["answer"]}]}
             for row in QUESTIONS[:12]]
    datasets.Dataset.from_list(chats).to_parquet(str(root / "chat.parquet"))
    datasets.Dataset.from_list(QUESTIONS[:8]).to_csv(str(root / "qa.csv"), index=False)
    (root / "repo").mkdir()  # a dataset repository's layout, read by the same call as a hub id
    (root / "repo" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in QUESTIONS[:6]))
    return root


def _run(*args: str):
    return CliRunner().invoke(main, ["calibration", *args])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tasks_from_a_saved_dataset_a_parquet_and_a_csv_file(data, tmp_path):
    out = tmp_path / "calib.jsonl"
    result = _run(str(out), "--samples-per-task", "10", "--seed", "3",
                  "--task", f"qa={data / 'qa'}:train", "--task", f"chat={data / 'chat.parquet'}:train",
                  "--task", f"csv={data / 'qa.csv'}:train",
                  "--prompt-field", "question", "--completion-template", " {{ answer }}",
                  "--messages-field", "chat=messages", "--prompt-template", "csv=Q: {{ question }} (#{{ label }})")
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    by_task = {task: [r for r in rows if r["task"] == task] for task in ("qa", "chat", "csv")}
    assert [len(v) for v in by_task.values()] == [10, 10, 8]  # the csv has 8 rows
    source = {row["question"]: row for row in QUESTIONS}
    for row in by_task["qa"]:
        index = int(row["source"].rsplit("#", 1)[1])
        assert row["prompt"] == QUESTIONS[index]["question"] and row["completion"] == " " + QUESTIONS[index]["answer"]
    assert all(row["prompt"].startswith("Q: ") and " (#" in row["prompt"] for row in by_task["csv"])
    assert all(row["messages"][-1]["role"] == "assistant" for row in by_task["chat"])
    assert {row["messages"][0]["content"] for row in by_task["chat"]} <= set(source)
    assert len(read_jsonl(out)) == 28  # what the solve reads
    assert "qa " in result.output and "30" in result.output and "chat from column 'messages'" in result.output


def test_the_sample_is_the_seeded_shuffle_and_rows_without_answers_are_skipped(data, tmp_path):
    import datasets

    out = tmp_path / "calib.jsonl"
    args = ["--task", f"qa={data / 'qa'}:train", "--samples-per-task", "29", "--seed", "5", "--prompt-field", "question",
            "--completion-field", "answer"]
    assert _run(str(out), *args).exit_code == 0
    again = tmp_path / "again.jsonl"
    assert _run(str(again), *args).exit_code == 0
    assert out.read_bytes() == again.read_bytes()  # the same seed, the same file
    shuffled = datasets.load_from_disk(str(data / "qa"))["train"].shuffle(seed=5)
    expected = [row["question"] for row in shuffled if row["label"] != 7]
    assert [row["prompt"] for row in _rows(out)] == expected  # Dataset.shuffle(seed)'s order
    other = tmp_path / "other.jsonl"
    assert _run(str(other), *[("6" if a == "5" else a) for a in args]).exit_code == 0  # another seed
    assert _rows(other) != _rows(out)


@pytest.mark.parametrize(("split", "expected"), [
    ("train[:9]", QUESTIONS[:7] + QUESTIONS[8:9]),  # row 7 has no answer
    ("validation[40%:]", QUESTIONS[2:5]),
    ("train[-3:]+validation[:2]", QUESTIONS[27:30] + QUESTIONS[:2]),
])
def test_a_saved_dataset_is_sliced_as_load_dataset_slices(split, expected, data, tmp_path):
    """``split`` as a hub dataset takes it (datasets' own split syntax), on a
    save_to_disk folder; the sample is the whole slice, shuffled."""
    out = tmp_path / "calib.jsonl"
    result = _run(str(out), "--task", f"qa={data / 'qa'}:{split}", "--prompt-field", "question",
                  "--completion-field", "answer", "--samples-per-task", "100")
    assert result.exit_code == 0, result.output
    assert sorted(r["prompt"] for r in _rows(out)) == sorted(row["question"] for row in expected)


def test_a_json_file_and_a_repository_folder(data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "calib.jsonl"
    result = _run(str(out), "--task", f"file={data / 'repo' / 'train.jsonl'}:train", "--task", f"repo={data / 'repo'}:train",
                  "--prompt-field", "question", "--completion-field", "answer")
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert [r["task"] for r in rows] == ["file"] * 6 + ["repo"] * 6
    assert [r["prompt"] for r in rows[:6]] == [r["prompt"] for r in rows[6:]]


def test_sharegpt_turns_become_chat_messages(data, tmp_path):
    out = tmp_path / "calib.jsonl"
    result = _run(str(out), "--task", f"chat={data / 'chat.parquet'}:train", "--messages-field", "conversations")
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert len(rows) == 12 and all([m["role"] for m in row["messages"]] == ["user", "assistant"] for row in rows)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--task", "qa={qa}:test"], "no split 'test' (the folder has train, validation)"),
    (["--task", "qa={qa}:train[:5]+test[:1]"], "no split 'test' (the folder has train, validation)"),
    (["--task", "qa={qa}:train[:x]"], "split 'train[:x]': Unrecognized instruction format"),
    (["--task", "qa={qa}:train", "--prompt-field", "prompt_text"], "no column 'prompt_text' for the prompt"),
    (["--task", "qa={qa}:train", "--prompt-field", "question", "--completion-field", "label"],
     "column 'label' holds int, not text"),
    (["--task", "qa={qa}:train", "--prompt-template", "{{ questoin }}", "--completion-field", "answer"],
     "'questoin' is undefined"),
    (["--task", "qa={qa}:train", "--prompt-template", "{{ question ", "--completion-field", "answer"],
     "prompt template:"),
    (["--task", "qa={qa}:train", "--messages-field", "question"], "not a list of turns"),
    (["--task", "qa"], "expected NAME=DATASET[:CONFIG]:SPLIT"),
    (["--task", "qa={qa}:train", "--task", "qa={qa}:validation"], "task names must be distinct"),
    (["--task", "hub=nobody/no-such-dataset-here:train"], "cannot load nobody/no-such-dataset-here:train"),
    (["--task", "x={csv_as_txt}:train"], "cannot read .txt files"),
])
def test_a_problem_is_one_line_naming_the_task_and_source(args, fragment, data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    text = tmp_path / "qa.txt"
    text.write_text("question,answer\n")
    out = tmp_path / "calib.jsonl"
    out.write_text("kept\n")  # a failed run leaves an existing file alone
    args = [a.replace("{qa}", str(data / "qa")).replace("{csv_as_txt}", str(text)) for a in args]
    result = _run(str(out), "--overwrite", *args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output and fragment in result.output, result.output
    assert out.read_text() == "kept\n" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_existing_file_needs_overwrite(data, tmp_path):
    out = tmp_path / "calib.jsonl"
    out.write_text("mine\n")
    result = _run(str(out), "--task", f"qa={data / 'qa'}:validation", "--prompt-field", "question",
                  "--completion-field", "answer")
    assert result.exit_code == 2 and "give --overwrite" in result.output and out.read_text() == "mine\n"


@pytest.mark.parametrize(("text", "parts"), [
    ("gsm8k=openai/gsm8k:main:train", ("gsm8k", "openai/gsm8k", "main", "train")),
    ("piqa=piqa:validation[:200]", ("piqa", "piqa", None, "validation[:200]")),
    ("x=/data/set:train", ("x", "/data/set", None, "train")),
    ("mix=org/set:cfg:train[-3:]+test[10%:20%]", ("mix", "org/set", "cfg", "train[-3:]+test[10%:20%]")),
])
def test_task_specs_parse(text, parts):
    assert parse_task(text) == parts


def test_a_local_path_with_a_colon_of_its_own(tmp_path):
    folder = tmp_path / "run:1"
    folder.mkdir()
    assert parse_task(f"x={folder}:train") == ("x", str(folder), None, "train")
