"""Chat rows rendered by the base's template: the tokens are the template's own, the
counted positions are exactly the assistant's tokens (transformers' assistant mask of
the same template is the reference), and a base or a conversation the template cannot
render is named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from mergekit_fw.calibration.batches import IGNORE_INDEX, build_calibration, encode
from mergekit_fw.calibration.rows import CalibrationError, read_jsonl
from mergekit_fw.cli import main
from tests.calibration.helpers import MARKED_TEMPLATE, PLAIN_TEMPLATE, ROW, as_chat, with_template, write_rows
from tests.paths import lora_config
from testbed.build import SIX, build_tokenizer

CONVERSATION = [
    {"role": "system", "content": "a b"},
    {"role": "user", "content": "reverse a b c ="},
    {"role": "assistant", "content": "c b a"},
    {"role": "user", "content": "sort b a ="},
    {"role": "assistant", "content": "a b"},
]


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """A word-level tokenizer with role markers and the generation-marked template."""
    folder = tmp_path_factory.mktemp("marked")
    tokenizer = build_tokenizer(folder, list(SIX), extra_words=["<|user|> <|assistant|> <|system|>"])
    tokenizer.chat_template = MARKED_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def _counted(calibration) -> list[list[int]]:
    """Per row of the one batch: the target ids at the counted positions."""
    batch = calibration.batches[0]
    return [batch.targets[row][batch.positions[row]].tolist() for row in range(batch.input_ids.shape[0])]


@pytest.mark.parametrize("turns", ["last", "all"])
def test_counted_tokens_are_the_templates_assistant_tokens(turns, marked, tmp_path):
    path = write_rows(tmp_path / "calib.jsonl", [{"task": "t", "messages": CONVERSATION}])
    calibration = build_calibration(path, marked, samples_per_task=1, batch_size=1, max_length=64,
                                    assistant_turns=turns)
    reference = marked.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    ids, mask = reference["input_ids"], reference["assistant_masks"]
    if turns == "last":  # the mask's last run of ones
        last = max(i for i, m in enumerate(mask) if m)
        first = last
        while mask[first - 1]:
            first -= 1
        mask = [int(first <= i <= last) for i in range(len(mask))]
    batch = calibration.batches[0]
    assert batch.input_ids[0].tolist() == ids  # the template's own tokens, no second BOS
    # position t counts where token t + 1 is the assistant's, and predicts that token
    assert batch.positions[0].tolist() == [bool(m) for m in mask[1:]] + [False]
    assert batch.targets[0][batch.positions[0]].tolist() == [t for t, m in zip(ids, mask) if m]
    assert (batch.targets[0][~batch.positions[0]] == IGNORE_INDEX).all()
    words = marked.convert_ids_to_tokens(batch.targets[0][batch.positions[0]].tolist())
    assert words == (["c", "b", "a", "</s>", "a", "b", "</s>"] if turns == "all" else ["a", "b", "</s>"])
    assert calibration.counted_positions.tolist() == [float(sum(mask))]


def test_entropy_reads_the_conversation_up_to_the_generation_prompt(marked, tmp_path):
    path = write_rows(tmp_path / "calib.jsonl", [{"task": "t", "messages": CONVERSATION}])
    calibration = build_calibration(path, marked, samples_per_task=1, batch_size=1, max_length=64, objective="entropy")
    expected = marked.apply_chat_template(CONVERSATION[:-1], tokenize=True, add_generation_prompt=True,
                                          return_dict=True)["input_ids"]
    batch = calibration.batches[0]
    assert batch.input_ids[0].tolist() == expected  # the closing answer dropped, as completions are
    assert batch.positions[0].nonzero().flatten().tolist() == [len(expected) - 1]


def test_a_chat_row_and_its_prompt_completion_twin_give_the_same_batches(random_pool, tmp_path):
    """Mixed files: with a template that renders [user, assistant] as prompt + ' ' +
    completion, each chat row is its twin's tokens and counted positions exactly."""
    tokenizer = AutoTokenizer.from_pretrained(str(random_pool["base"]))
    tokenizer.chat_template = PLAIN_TEMPLATE
    rows = [{**ROW, "completion": c} for c in ("= c b a", "= c", "= c b")] + [{**ROW, "task": "sort"}]
    plain = write_rows(tmp_path / "plain.jsonl", rows)
    mixed = write_rows(tmp_path / "mixed.jsonl", [as_chat(rows[0]), rows[1], as_chat(rows[2]), as_chat(rows[3])])
    built = [build_calibration(p, tokenizer, samples_per_task=10, batch_size=2, max_length=64) for p in (plain, mixed)]
    assert built[0].tasks == built[1].tasks and torch.equal(built[0].counted_positions, built[1].counted_positions)
    for one, two in zip(built[0].batches, built[1].batches, strict=True):
        for name in ("input_ids", "attention_mask", "targets", "positions"):
            assert torch.equal(getattr(one, name), getattr(two, name)), name


def test_max_length_cuts_a_conversation_from_the_left_never_inside_the_answer(marked, tmp_path):
    path = write_rows(tmp_path / "calib.jsonl", [{"task": "t", "messages": CONVERSATION}])
    row = read_jsonl(path)[0]
    whole = encode(marked, row, 64, True, "all")
    assert whole is not None and len(whole.counted) == 2
    gone = whole.counted[0][0]  # cut up to the first answer: no position is left to predict its first token
    cut = encode(marked, row, len(whole.ids) - gone, True, "all")
    assert cut is not None and cut.ids == whole.ids[gone:] and len(cut.counted) == 1
    kept = encode(marked, row, len(whole.ids) - gone + 1, True, "all")
    assert kept is not None and len(kept.counted) == 2
    assert cut.ids[cut.counted[0][0]:cut.counted[0][1]] == whole.ids[whole.counted[1][0]:whole.counted[1][1]]
    assert encode(marked, row, 3, True, "last") is None  # the answer itself does not fit


def test_a_base_without_a_chat_template_is_named_with_the_row(random_pool, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(random_pool["base"]))
    path = write_rows(tmp_path / "calib.jsonl", [ROW, as_chat(ROW)])
    with pytest.raises(CalibrationError) as caught:
        build_calibration(path, tokenizer, samples_per_task=10, batch_size=2, max_length=64)
    assert str(caught.value).startswith(f"{path}:2: this row is a chat conversation")
    assert "has no chat template" in str(caught.value)


def test_a_conversation_the_template_refuses_is_named_with_its_words(random_pool, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(random_pool["base"]))
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }} {% endfor %}"
    )
    path = write_rows(tmp_path / "calib.jsonl", [{"task": "t", "messages": [{"role": "system", "content": "x"},
                                                                            *as_chat(ROW)["messages"]]}])
    with pytest.raises(CalibrationError) as caught:
        build_calibration(path, tokenizer, samples_per_task=10, batch_size=2, max_length=64)
    assert str(caught.value).startswith(f"{path}:1: the chat template")
    assert "System role not supported" in str(caught.value)


def test_a_template_that_rewrites_earlier_turns_is_refused(random_pool, tmp_path):
    """Some templates render only the last turns, or change a turn once another follows:
    the answer's tokens are then not where the shorter render says."""
    tokenizer = AutoTokenizer.from_pretrained(str(random_pool["base"]))
    tokenizer.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %} ={% endif %}"
    path = write_rows(tmp_path / "calib.jsonl", [as_chat(ROW)])
    with pytest.raises(CalibrationError, match="does not render the conversation up to assistant turn 1 as a prefix"):
        build_calibration(path, tokenizer, samples_per_task=10, batch_size=2, max_length=64)


def test_a_mixed_file_solves_exactly_as_its_prompt_completion_twin(random_pool, tmp_path, monkeypatch):
    """Through ``mergekit-fw solve``: half the rows as chat conversations rendered by
    the base's template give the table of the all prompt/completion file."""
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    base = with_template(random_pool["base"], tmp_path / "base", PLAIN_TEMPLATE)
    rows = [json.loads(line) for line in Path(random_pool["calibration"]).read_text().splitlines()]
    mixed = write_rows(tmp_path / "mixed.jsonl", [as_chat(row) if i % 2 else row for i, row in enumerate(rows)])
    tables = {}
    for name, calibration in (("plain", random_pool["calibration"]), ("mixed", mixed)):
        config = lora_config(tmp_path / f"{name}.yml", base, random_pool["adapters"][:2], calibration, iterations=2)
        table = tmp_path / f"{name}.json"
        result = CliRunner().invoke(main, ["solve", str(config), "--table", str(table), "--quiet"])
        assert result.exit_code == 0, result.output
        tables[name] = json.loads(table.read_text())
    assert tables["plain"]["fingerprint"] != tables["mixed"]["fingerprint"]  # a different file, solved anew
    assert tables["mixed"]["weights"] == tables["plain"]["weights"]
    assert any(w > 0 for column in tables["mixed"]["coefficients"].values() for w in column)


def test_without_offsets_the_answer_is_found_by_encoding_prefixes(marked):
    """A tokenizer without offsets (not a fast one) finds the same tokens by encoding
    the text up to each boundary."""
    from mergekit_fw.calibration.chat import tokens_of

    text = marked.apply_chat_template(CONVERSATION, tokenize=False)
    by_offsets, with_offsets = tokens_of(marked, text, "x", offsets=True)
    by_prefix, with_prefixes = tokens_of(marked, text, "x", offsets=False)
    assert by_offsets == by_prefix
    answer = text.index("<|assistant|> c b a") + len("<|assistant|> ")
    chars = (answer, answer + len("c b a </s>"))
    assert with_offsets(chars) == with_prefixes(chars) == (13, 17)
