"""Calibration rows from Hugging Face datasets: the ``mergekit-fw calibration`` command.

Users hold their data as datasets (on the hub, saved with ``save_to_disk``, or as
json / csv / parquet files), not as our JSONL; this samples each task's split with a
fixed seed, maps its fields (or renders Jinja templates over them, the language chat
templates are written in) to prompt and completion or to chat messages, and writes
the JSONL the solve reads, every row carrying the dataset row it came from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mergekit_fw.calibration.rows import CalibrationError
from mergekit_fw.files import write_text_atomic

LOG = logging.getLogger(__name__)

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
# ShareGPT-style conversations ({"from": "human", "value": ...}) are common in community data
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class TaskSource(BaseModel):
    """Where one task's calibration rows come from and how a dataset row becomes one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(min_length=1, description="Task name written in every row.")
    dataset: str = Field(
        min_length=1,
        description="A hub dataset id, a folder written by save_to_disk, or a json, jsonl, csv or parquet file.",
    )
    config: str | None = Field(None, description="The dataset's configuration (subset), where it has several.")
    split: str = Field(min_length=1, description="The split to sample, e.g. train or validation[:2000].")
    prompt_field: str = Field("prompt", description="Column holding the prompt (ignored with a prompt template).")
    completion_field: str = Field(
        "completion", description="Column holding the completion (ignored with a completion template)."
    )
    messages_field: str | None = Field(
        None,
        description="Column holding a chat conversation (a list of {role, content} or ShareGPT "
        "{from, value} turns); writes chat rows instead of prompt and completion.",
    )
    prompt_template: str | None = Field(
        None, description="Jinja template over the row's columns giving the prompt, e.g. 'Q: {{ question }} A:'."
    )
    completion_template: str | None = Field(
        None, description="Jinja template over the row's columns giving the completion, e.g. ' {{ answer }}'."
    )

    @property
    def where(self) -> str:
        return ":".join(part for part in (self.dataset, self.config, self.split) if part)


@dataclass
class Sampled:
    """What one task's sampling read and kept (the command's report)."""

    source: TaskSource
    available: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


def parse_task(text: str) -> tuple[str, str, str | None, str]:
    """``NAME=DATASET[:CONFIG]:SPLIT`` into its parts. The split may slice and join
    (``validation[:200]``, ``train[-3:]+test[:2]``), and a local path may hold a colon
    of its own: ``DATASET:CONFIG`` that names an existing path is read as the dataset."""
    name, sep, rest = text.partition("=")
    depth, masked = 0, []
    for char in rest:  # colons inside [...] belong to the split's slices
        depth += (char == "[") - (char == "]")
        masked.append("\0" if char == ":" and depth > 0 else char)
    parts = [part.replace("\0", ":") for part in "".join(masked).rsplit(":", 2)]
    if not sep or not name.strip() or len(parts) < 2 or not all(part.strip() for part in parts):
        raise CalibrationError(
            f"--task {text!r}: expected NAME=DATASET[:CONFIG]:SPLIT, e.g. gsm8k=openai/gsm8k:main:train"
        )
    split = parts[-1]
    if len(parts) == 2 or Path(f"{parts[0]}:{parts[1]}").expanduser().exists():
        return name.strip(), ":".join(parts[:-1]), None, split
    return name.strip(), parts[0], parts[1], split


def scoped(values: Sequence[str], tasks: Iterable[str]) -> tuple[str | None, dict[str, str]]:
    """A repeated option's values: one without a task prefix applies to every task,
    ``TASK=VALUE`` to that task alone (a value whose text before its first ``=`` is
    not a task name is taken whole)."""
    names = set(tasks)
    everyone: str | None = None
    per_task: dict[str, str] = {}
    for value in values:
        head, sep, tail = value.partition("=")
        if sep and head in names:
            per_task[head] = tail
        else:
            everyone = value
    return everyone, per_task


def _read_split(splits: dict, spec: str):
    """``spec`` read from splits on disk the way ``load_dataset`` reads it from a hub
    dataset (``train``, ``validation[:200]``, ``train[10%:]``, ``a+b``): datasets'
    own parser turns it into row ranges."""
    import datasets

    unknown = [name for name in (part.split("[")[0].strip() for part in spec.split("+")) if name not in splits]
    if unknown:
        raise CalibrationError(f"no split {unknown[0]!r} (the folder has {', '.join(splits)})")
    try:
        ranges = datasets.ReadInstruction.from_spec(spec).to_absolute({name: len(d) for name, d in splits.items()})
    except (ValueError, AssertionError) as error:
        raise CalibrationError(f"split {spec!r}: {error}") from None
    parts = [splits[part.splitname].select(range(part.from_, part.to)) for part in ranges]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_split(source: TaskSource):
    """The split as a ``datasets.Dataset``; every failure is a one-line error naming
    the task and the source (offline, an unknown split, a file that does not parse)."""
    import datasets

    path = Path(source.dataset).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            if source.config:
                raise CalibrationError(
                    f"a folder written by save_to_disk has no configurations (got {source.config!r})"
                )
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return _read_split(dict(loaded), source.split)
            if loaded.split is None:
                return loaded
            return _read_split({str(loaded.split): loaded}, source.split)
        if path.is_file():
            builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                known = ", ".join(sorted(DATA_FILE_BUILDERS))
                raise CalibrationError(f"cannot read {path.suffix or 'a file without suffix'} files (known: {known})")
            if source.config:
                raise CalibrationError(f"a data file has no configurations (got {source.config!r})")
            return datasets.load_dataset(builder, data_files=str(path), split=source.split)
        return datasets.load_dataset(source.dataset, source.config, split=source.split)
    except CalibrationError as error:
        raise CalibrationError(f"task {source.task!r} ({source.where}): {error}") from None
    except Exception as error:  # datasets raises many kinds: name the source, keep its words
        offline = (
            " (offline: a hub dataset must be in the local cache)"
            if getattr(datasets.config, "HF_DATASETS_OFFLINE", False)
            or getattr(datasets.config, "HF_HUB_OFFLINE", False)
            else ""
        )
        raise CalibrationError(
            f"task {source.task!r}: cannot load {source.where}: {type(error).__name__}: {error}{offline}"
        ) from None


def _templates(source: TaskSource):
    """Compiled templates, in a sandbox (templates may come from shared scripts) and
    strict: a column name the row lacks is an error, not an empty string."""
    if source.prompt_template is None and source.completion_template is None:
        return None, None
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    compiled = []
    for name, text in (("prompt", source.prompt_template), ("completion", source.completion_template)):
        try:
            compiled.append(environment.from_string(text) if text is not None else None)
        except TemplateSyntaxError as error:
            raise CalibrationError(
                f"task {source.task!r}: {name} template: {error.message} (line {error.lineno})"
            ) from None
    return compiled[0], compiled[1]


def _text(row: Mapping[str, Any], template, column: str, what: str, at: str) -> str:
    if template is not None:
        try:
            return str(template.render(**row))
        except Exception as error:  # an unknown column (StrictUndefined), a filter on the wrong type
            raise CalibrationError(f"{at}: {what} template: {type(error).__name__}: {error}") from None
    if column not in row:
        raise CalibrationError(f"{at}: no column {column!r} for the {what} (columns: {', '.join(row)})")
    value = row[column]
    if not isinstance(value, str):
        raise CalibrationError(
            f"{at}: column {column!r} holds {type(value).__name__}, not text; give a {what} template "
            f"(e.g. '{{{{ {column} }}}}') to write it as text"
        )
    return value


def _messages(row: Mapping[str, Any], column: str, at: str) -> list[dict[str, str]]:
    if column not in row:
        raise CalibrationError(f"{at}: no column {column!r} for the messages (columns: {', '.join(row)})")
    turns = row[column]
    if not isinstance(turns, list):
        raise CalibrationError(f"{at}: column {column!r} holds {type(turns).__name__}, not a list of turns")
    messages = []
    for index, turn in enumerate(turns):
        if isinstance(turn, Mapping) and "role" in turn:
            role, content = turn.get("role"), turn.get("content")
        elif isinstance(turn, Mapping) and "from" in turn:
            role, content = SHAREGPT_ROLES.get(str(turn.get("from")), turn.get("from")), turn.get("value")
        else:
            raise CalibrationError(f"{at}: {column}[{index}] is not a {{role, content}} or {{from, value}} turn")
        if not isinstance(role, str) or not isinstance(content, str):
            raise CalibrationError(f"{at}: {column}[{index}]: role and content must be text")
        messages.append({"role": role, "content": content})
    return messages


def _row(source: TaskSource, record: Mapping[str, Any], index: int, templates) -> dict[str, Any] | None:
    """One calibration row, or ``None`` for a row without an answer to count (empty
    text, or a conversation that does not end with the assistant)."""
    at = f"task {source.task!r} ({source.where}), row {index}"
    origin = f"{source.where}#{index}"
    if source.messages_field is not None:
        messages = _messages(record, source.messages_field, at)
        usable = messages and messages[-1]["role"] == "assistant" and messages[-1]["content"].strip()
        return {"task": source.task, "messages": messages, "source": origin} if usable else None
    prompt = _text(record, templates[0], source.prompt_field, "prompt", at)
    completion = _text(record, templates[1], source.completion_field, "completion", at)
    if not prompt.strip() or not completion.strip():
        return None
    return {"task": source.task, "prompt": prompt, "completion": completion, "source": origin}


def sample_task(source: TaskSource, samples: int, seed: int) -> Sampled:
    """``samples`` rows of the split in the order of a seeded shuffle; rows without an
    answer are skipped and the next ones taken, so the count holds where the data allows."""
    import numpy as np

    data = _load_split(source)
    templates = _templates(source)
    sampled = Sampled(source, len(data))
    # the permutation Dataset.shuffle(seed=seed) draws, kept as row numbers of the split
    for index in np.random.default_rng(seed).permutation(len(data)).tolist():
        if len(sampled.rows) == samples:
            break
        row = _row(source, data[index], index, templates)
        if row is None:
            sampled.skipped += 1
        else:
            sampled.rows.append(row)
    if not sampled.rows:
        raise CalibrationError(
            f"task {source.task!r} ({source.where}): no usable row among {len(data)} "
            "(empty prompts or answers, or conversations that do not end with the assistant)"
        )
    if len(sampled.rows) < samples:
        LOG.warning("task %r: %d usable rows, fewer than the %d asked", source.task, len(sampled.rows), samples)
    return sampled


def write_calibration(out: Path, sources: Sequence[TaskSource], samples: int, seed: int) -> list[Sampled]:
    """Sample every task, then write the JSONL in one atomic step: a failure on any
    task leaves no file (and an existing one untouched)."""
    names = [source.task for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise CalibrationError(f"task names must be distinct (repeated: {', '.join(repeated)})")
    report = [sample_task(source, samples, seed) for source in sources]
    lines = [json.dumps(row, ensure_ascii=False) for sampled in report for row in sampled.rows]
    write_text_atomic(out, "\n".join(lines) + "\n")
    return report


MAPPING_OPTIONS = ("prompt_field", "completion_field", "messages_field", "prompt_template", "completion_template")


def task_sources(tasks: Sequence[str], mappings: Mapping[str, Sequence[str]]) -> list[TaskSource]:
    """The command line's ``--task`` values and mapping options as one source per task;
    ``mappings``: option name (a :data:`MAPPING_OPTIONS` entry) to its values, each
    for every task or, as ``TASK=VALUE``, for one."""
    parsed = [parse_task(text) for text in tasks]
    names = [name for name, *_ in parsed]
    sources = []
    for name, dataset, config, split in parsed:
        chosen: dict[str, Any] = {}
        for option in MAPPING_OPTIONS:
            everyone, per_task = scoped(mappings.get(option, ()), names)
            value = per_task.get(name, everyone)
            if value is not None:
                chosen[option] = value
        sources.append(TaskSource(task=name, dataset=dataset, config=config, split=split, **chosen))
    return sources


def _shape(source: TaskSource) -> str:
    if source.messages_field is not None:
        return f"chat from column {source.messages_field!r}"
    prompt = "template" if source.prompt_template is not None else f"column {source.prompt_field!r}"
    completion = "template" if source.completion_template is not None else f"column {source.completion_field!r}"
    return f"prompt: {prompt}, completion: {completion}"


def format_report(report: Sequence[Sampled], out: Path, seed: int) -> str:
    """What was sampled, per task: the source, how many rows it has, how many were
    kept and skipped, and how rows were made."""
    lines = [f"{'task':16} {'source':40} {'rows':>8} {'kept':>6} {'skipped':>8}  made from"]
    for sampled in report:
        source = sampled.source
        lines.append(
            f"{source.task:16} {source.where:40} {sampled.available:8d} {len(sampled.rows):6d} "
            f"{sampled.skipped:8d}  {_shape(source)}"
        )
    total = sum(len(sampled.rows) for sampled in report)
    lines.append(f"{total} rows written to {out} (shuffle seed {seed}; each row's 'source' names its dataset row)")
    return "\n".join(lines)
