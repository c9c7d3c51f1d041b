"""The evidence pool builder on a miniature size: every kind of member is built,
recorded and reusable, and the adapters really are community-like (mixed styles)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from testbed import build
from testbed.build import build_pool, greedy_scores, train_mtl
from testbed.data import read_rows


def test_every_member_is_built_and_recorded(tiny_pool):
    roles = sorted((c["task"], c["role"], c["kind"]) for c in tiny_pool.candidates)
    assert roles == sorted([("reverse", "task", "lora"), ("sort", "task", "lora"), ("firstlow", "task", "lora"),
                            ("reverse", "duplicate", "lora"), ("sort", "noisy", "lora"), ("reverse", "task", "full")])
    styles = {json.dumps(c["style"]) for c in tiny_pool.candidates if c["kind"] == "lora"}
    assert len(styles) >= 3  # mixed ranks / alphas / rsLoRA / targets
    for c in tiny_pool.candidates:
        config = json.loads(((tiny_pool.root / c["path"]) / ("adapter_config.json" if c["kind"] == "lora" else "config.json")).read_text())
        if c["kind"] == "lora":
            assert [config["r"], config["lora_alpha"], config["use_rslora"]] == c["style"][:3]
            assert sorted(config["target_modules"]) == sorted(c["style"][3])
            expected_base = tiny_pool.noisy_base if c["role"] == "noisy" else tiny_pool.base
            assert config["base_model_name_or_path"] == str(expected_base)
    for task, files in tiny_pool.files.items():
        assert len(read_rows(files.test)) == 6 and files.lm_eval_yaml.is_file()


def test_noisy_base_is_another_initialisation(tiny_pool):
    from safetensors.torch import load_file

    a = load_file(str(tiny_pool.base / "model.safetensors"))
    b = load_file(str(tiny_pool.noisy_base / "model.safetensors"))
    assert a.keys() == b.keys() and not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_a_complete_build_is_reused(tiny_pool, monkeypatch):
    monkeypatch.setattr(build, "train_base", lambda *a, **k: pytest.fail("retrained a cached pool"))
    again = build_pool(tiny_pool.root, tiny_pool.size, seed=0)
    assert again.candidates == tiny_pool.candidates


def test_an_interrupted_build_keeps_the_members_it_finished(tiny_pool, tmp_path, monkeypatch):
    """Killed before its manifest, with one member's save cut short: the same recipe goes on,
    keeping the finished members bit for bit and training only the cut one; another seed
    trains every member again."""
    import shutil

    root = tmp_path / "pool"
    shutil.copytree(tiny_pool.root, root)
    (root / "manifest.json").unlink()
    cut = next(c for c in tiny_pool.candidates if c["kind"] == "lora")
    cut_folder = root / "loras" / cut["name"]
    (cut_folder / build.MEMBER_FILE).unlink()
    (cut_folder / "adapter_model.safetensors").write_bytes(b"half a file")
    kept = {c["name"]: (root / Path(c["path"]).relative_to(tiny_pool.root) / _weights(c)).read_bytes()
            for c in tiny_pool.candidates if c["name"] != cut["name"]}
    trained: list[str] = []
    real_lora = build.train_lora
    monkeypatch.setattr(build, "train_base", lambda *a, **k: pytest.fail("retrained the base"))
    monkeypatch.setattr(build, "train_dense", lambda *a, **k: pytest.fail("retrained a finished full member"))
    monkeypatch.setattr(build, "train_lora", lambda base, folder, *a: trained.append(folder.name) or real_lora(base, folder, *a))
    again = build_pool(root, tiny_pool.size, seed=0)
    assert trained == [cut["name"]]
    assert [c["name"] for c in again.candidates] == [c["name"] for c in tiny_pool.candidates]
    assert all(Path(c["path"]).is_relative_to(root) for c in again.candidates)
    for name, data in kept.items():
        candidate = next(c for c in again.candidates if c["name"] == name)
        assert (Path(candidate["path"]) / _weights(candidate)).read_bytes() == data
    rebuilt = (cut_folder / "adapter_model.safetensors").read_bytes()
    assert rebuilt == (tiny_pool.root / "loras" / cut["name"] / "adapter_model.safetensors").read_bytes()
    assert json.loads((root / "manifest.json").read_text())["complete"]

    (root / "manifest.json").unlink()  # another recipe: nothing of this one is kept
    trained.clear()
    monkeypatch.setattr(build, "train_dense", lambda *a, **k: trained.append("dense") or 0.0)
    monkeypatch.setattr(build, "train_lora", lambda base, folder, *a: trained.append(folder.name) or 0.0)
    monkeypatch.setattr(build, "pretrained_base", lambda *a, **k: None)
    build_pool(root, tiny_pool.size, seed=1)
    assert len(trained) == len(tiny_pool.candidates)


def _weights(candidate: dict) -> str:
    return "adapter_model.safetensors" if candidate["kind"] == "lora" else "model.safetensors"


def test_mtl_adapter_and_in_process_scores(tiny_pool):
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = train_mtl(tiny_pool, ["reverse", "firstlow"], per_task=8)
    assert train_mtl(tiny_pool, ["firstlow", "reverse"], per_task=8) == folder  # cached per asked set
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_pool.base))
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(tiny_pool.base)), str(folder)).eval()
    for task in ("reverse", "firstlow"):
        score = greedy_scores(model, tokenizer, read_rows(tiny_pool.files[task].test))
        assert 0.0 <= score <= 1.0


def test_sanity_table_merges_the_relevant_adapters_exactly(tiny_pool):
    """The relevant-merge check: the merged model is base + sum_i w_i delta_i, built by
    mergekit-fw's writer, and the table has every column for every asked task."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from testbed.sanity import markdown, merged_model, sanity_table

    entries = [tiny_pool.candidate("reverse"), tiny_pool.candidate("sort")]
    merged = merged_model(tiny_pool, entries, [0.5, 0.5]).state_dict()
    base = LlamaForCausalLM.from_pretrained(str(tiny_pool.base)).state_dict()
    expected = {k: v.clone().double() for k, v in base.items()}
    for entry in entries:
        full = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(tiny_pool.base)), entry["path"]).merge_and_unload().state_dict()
        for key in expected:
            expected[key] += 0.5 * (full[key].double() - base[key].double())
    for key, value in expected.items():
        torch.testing.assert_close(merged[key].double(), value, rtol=1e-5, atol=1e-6)

    table = sanity_table(tiny_pool, ["reverse", "firstlow"])
    assert [row["task"] for row in table] == ["reverse", "firstlow"]
    assert all(len(row) == 7 and all(0.0 <= row[k] <= 1.0 for k in row if k != "task" and row[k] is not None) for row in table)
    skill = {row["task"]: row["base: some rule of the format"] for row in table}
    assert skill["firstlow"] is None and 0.0 <= skill["reverse"] <= 1.0  # choice tasks have no rule check
    assert skill["reverse"] >= table[0]["base"]  # the right rule is one of the format's rules
    assert "| **mean** |" in markdown(table, "t")


def test_a_base_trained_by_the_same_recipe_is_reused(tiny_pool, monkeypatch):
    from dataclasses import replace

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_pool.base))
    monkeypatch.setattr(build, "train_base", lambda *a, **k: pytest.fail("retrained a base of the same recipe"))
    build.pretrained_base(tiny_pool.base, tokenizer, tiny_pool.size, seed=0)
    build.pretrained_base(tiny_pool.noisy_base, tokenizer, tiny_pool.size, seed=1000)
    # the members' recipe is not the base's: a change there keeps the base
    build.pretrained_base(tiny_pool.base, tokenizer, replace(tiny_pool.size, lora_steps=tiny_pool.size.lora_steps + 1), seed=0)
    trained = []
    monkeypatch.setattr(build, "train_base", lambda folder, *a, **k: trained.append(folder))
    key = (tiny_pool.base / build.BASE_KEY_FILE).read_text()
    try:
        build.pretrained_base(tiny_pool.base, tokenizer, replace(tiny_pool.size, base_lr=tiny_pool.size.base_lr / 2), seed=0)
        build.pretrained_base(tiny_pool.base, tokenizer, tiny_pool.size, seed=1)
    finally:
        (tiny_pool.base / build.BASE_KEY_FILE).write_text(key)
    assert trained == [tiny_pool.base, tiny_pool.base]


def test_a_pool_of_the_tasks_adapters_only_has_the_full_pools_own(tiny_pool, tmp_path):
    """``evals.run --tasks-only`` builds the base, the data and the tasks' adapters alone:
    they must be the full pool's, bit for bit, or experiment 9's numbers would not be
    the full testbed's."""
    from dataclasses import replace

    from safetensors.torch import load_file

    alone = build_pool(tmp_path / "pool", replace(tiny_pool.size, duplicates=(), noisy=(), dense=()), seed=0)
    assert sorted(c["role"] for c in alone.candidates) == ["task"] * len(tiny_pool.size.tasks)
    for candidate in alone.candidates:
        theirs = next(c for c in tiny_pool.candidates if c["name"] == candidate["name"])
        mine = load_file(str(alone.root / candidate["path"] / "adapter_model.safetensors"))
        full = load_file(str(tiny_pool.root / theirs["path"] / "adapter_model.safetensors"))
        assert mine.keys() == full.keys() and all(torch.equal(mine[k], full[k]) for k in mine)
    for task in tiny_pool.size.tasks:
        assert alone.files[task].test.read_bytes() == tiny_pool.files[task].test.read_bytes()
