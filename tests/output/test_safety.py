"""Outputs are complete or absent, never clobbered by accident, never written by two
runs at once; the same config and seed give byte-identical results on both paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_fw.cli import main
from mergekit_fw.output.writer import OutputBusy, output_lock
from tests.conftest import subprocess_env
from tests.paths import mergekit_fw_here, mergekit_fw_run, mergekit_yaml, tensors, write_config


def _config(random_pool, path, dtype="bfloat16", **parameters):
    base = random_pool["base"]
    models = [{"model": f"{base}+{random_pool['adapters'][0]}"}, {"model": f"{base}+{random_pool['saved_adapter']}"},
              {"model": f"{base}+{random_pool['adapters'][2]}"}, {"model": str(random_pool["dense"][0])}]
    return write_config(path, {"merge_method": "frank_wolfe", "base_model": str(base), "models": models, "dtype": dtype,
                               "parameters": {"calibration": str(random_pool["calibration"]), "iterations": 3, **parameters}})


def _raw_tensors(folder):
    """name -> (dtype, shape, bytes) of every tensor: equality here is byte identity."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(str(shard)).items():
            out[name] = (tensor.dtype, tuple(tensor.shape), tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return out


def test_an_existing_output_is_kept_without_overwrite(random_pool, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    config = _config(random_pool, tmp_path / "fw.yml")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["run", str(config), str(out), "--quiet"])
    assert result.exit_code == 2 and "--overwrite" in result.output and str(out) in result.output
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert not list((tmp_path / "cache").rglob("fw_table.json"))  # refused before any solve
    result = CliRunner().invoke(main, ["run", str(config), str(out), "--quiet", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "fw.yml", "out"]  # no lock or partial left


def test_a_second_run_on_the_same_output_fails_clearly(random_pool, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    config = _config(random_pool, tmp_path / "fw.yml")
    out = tmp_path / "out"
    with output_lock(out, overwrite=False):  # another run holds it
        with pytest.raises(OutputBusy):
            with output_lock(out, overwrite=False):
                pass
        result = CliRunner().invoke(main, ["run", str(config), str(out), "--quiet"])
        assert result.exit_code == 2 and "another run is writing it" in result.output
        assert not out.exists()


@pytest.mark.slow
def test_same_config_and_seed_are_byte_identical_across_runs_and_paths(random_pool, tmp_path):
    config = _config(random_pool, tmp_path / "fw.yml", seed=3)
    mergekit_fw_run(config, tmp_path / "a", MERGEKIT_FW_CACHE=str(tmp_path / "cache_a"))
    mergekit_fw_here(config, tmp_path / "b", MERGEKIT_FW_CACHE=str(tmp_path / "cache_b"))  # solved again
    mergekit_yaml(config, tmp_path / "yaml", MERGEKIT_FW_CACHE=str(tmp_path / "cache_c"))
    table = (tmp_path / "a" / "fw_table.json").read_bytes()
    assert (tmp_path / "b" / "fw_table.json").read_bytes() == table
    assert (tmp_path / "yaml" / "fw_table.json").read_bytes() == table
    a = _raw_tensors(tmp_path / "a")
    assert _raw_tensors(tmp_path / "b") == a
    assert _raw_tensors(tmp_path / "yaml") == a
    weights = json.loads(table)["coefficients"]
    assert any(0 < max(row) < 1 for row in weights.values())  # a real mixture, not a copy of one vertex


def _big_pool(root):
    """A base big enough (~260 MB) that writing it takes long enough to be killed mid-way."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from testbed.build import SIX as SKILLS, build_tokenizer

    build_tokenizer(root / "base", list(SKILLS))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(root / "base"))
    adapters = []
    for index in range(2):
        torch.manual_seed(index + 1)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(str(root / "base")),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        model.save_pretrained(str(root / f"lora{index}"))
        adapters.append(root / f"lora{index}")
    return root / "base", adapters


@pytest.mark.slow
def test_sigkill_while_writing_leaves_no_output_and_a_rerun_succeeds(random_pool, tmp_path):
    base, adapters = _big_pool(tmp_path)
    config = write_config(tmp_path / "fw.yml", {
        "merge_method": "frank_wolfe", "base_model": str(base), "dtype": "float32",
        "models": [{"model": f"{base}+{a}"} for a in adapters],
        "parameters": {"calibration": str(random_pool["calibration"]), "iterations": 2}})
    cache = str(tmp_path / "cache")
    mergekit_fw_here(config, tmp_path / "first", MERGEKIT_FW_CACHE=cache)  # solve once; the next run only writes
    out = tmp_path / "out"
    argv = ["mergekit-fw", "run", str(config), str(out), "--quiet", "--out-shard-size", "20M"]
    process = subprocess.Popen(argv, env=subprocess_env(MERGEKIT_FW_CACHE=cache), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(p.is_dir() and any(p.iterdir()) for p in tmp_path.glob(".out.partial-*")):
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not out.exists()
    assert list(tmp_path.glob(".out.partial-*"))  # it really was killed mid-write

    mergekit_fw_here(config, out, MERGEKIT_FW_CACHE=cache)
    assert not list(tmp_path.glob(".out.partial-*")) and not list(tmp_path.glob(".out.lock"))
    written, reference = tensors(out), tensors(tmp_path / "first")
    assert written.keys() == reference.keys()
    assert all(torch.equal(written[name], reference[name]) for name in reference)


@pytest.mark.slow
def test_two_concurrent_runs_on_one_cache_solve_once_and_agree(random_pool, tmp_path):
    """The second run waits on the cache's lock, then reuses the first's solve."""
    config = _config(random_pool, tmp_path / "fw.yml", seed=5)
    env = subprocess_env(MERGEKIT_FW_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    runs = [subprocess.Popen(["mergekit-fw", "run", str(config), str(tmp_path / name), "--quiet", "--threads", "1"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
    reused = sorted(json.loads((tmp_path / name / "fw_trace.json").read_text())["reused_cached_solve"] for name in ("a", "b"))
    assert reused == [False, True]
    assert (tmp_path / "a" / "fw_table.json").read_bytes() == (tmp_path / "b" / "fw_table.json").read_bytes()
    assert _raw_tensors(tmp_path / "a") == _raw_tensors(tmp_path / "b")
