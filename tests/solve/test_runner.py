"""The solve cache: a killed run resumes to the uninterrupted result; a changed
adapter never reuses a stale solve."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import subprocess_env
from tests.paths import checkpointed_iterations, mergekit_fw_here, mergekit_fw_run, tensors, write_config


def _config(testbed, path, **parameters):
    config = yaml.safe_load((testbed.root / "fw.yml").read_text())
    config["parameters"].update(parameters)
    return write_config(path, config)


def _solve_in(config, cache, monkeypatch):
    """The cached solve of ``config`` with its cache in ``cache`` (the in-process memo cleared)."""
    from mergekit_fw.integration.configs import load_merge_config, pool_and_parameters
    from mergekit_fw.integration.stock import solve
    from mergekit_fw.solve import runner

    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(cache))
    runner._MEMO.clear()
    spec, params = pool_and_parameters(load_merge_config(config))
    return solve(spec, params, progress=False)


def _killed_after_two_checkpoints(module, monkeypatch, run):
    """Run ``run()`` with ``module.save_checkpoint`` raising after its second save (a kill
    just after a checkpoint), then restore it; returns the iterations each save held."""
    saved = module.save_checkpoint
    calls = []

    def crash_after_two(path, table, trace, **extra):
        saved(path, table, trace, **extra)
        calls.append(len(trace.iterations))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(module, "save_checkpoint", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(module, "save_checkpoint", saved)
    return calls


@pytest.mark.slow
def test_sigkill_mid_solve_then_the_same_command_resumes_to_the_uninterrupted_table(testbed, tmp_path):
    config = _config(testbed, tmp_path / "fw.yml", iterations=12)
    killed_cache, out = tmp_path / "killed", tmp_path / "out"
    argv = ["mergekit-fw", "run", str(config), str(out), "--quiet"]
    process = subprocess.Popen(argv, env=subprocess_env(MERGEKIT_FW_CACHE=str(killed_cache)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    seen = 0
    while seen < 2:
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
        seen = checkpointed_iterations(killed_cache)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not out.exists()

    mergekit_fw_run(config, out, MERGEKIT_FW_CACHE=str(killed_cache))
    resumed = json.loads((out / "fw_trace.json").read_text())
    assert len(resumed["resumed_at"]) == 1 and resumed["resumed_at"][0] >= seen
    assert not list(killed_cache.glob("*/fw_checkpoint.json"))  # cleaned up after the finished solve

    mergekit_fw_here(config, tmp_path / "clean", MERGEKIT_FW_CACHE=str(tmp_path / "clean_cache"))
    clean = json.loads((tmp_path / "clean" / "fw_trace.json").read_text())
    assert clean["resumed_at"] == []
    assert [it["loss"] for it in resumed["iterations"]] == [it["loss"] for it in clean["iterations"]]
    table = json.loads((out / "fw_table.json").read_text())
    clean_table = json.loads((tmp_path / "clean" / "fw_table.json").read_text())
    assert table["weights"] == clean_table["weights"]  # identical, not merely close
    written, reference = tensors(out), tensors(tmp_path / "clean")
    assert all(torch.equal(written[name], reference[name]) for name in reference)


def test_an_adapter_changed_in_place_is_solved_again(random_pool, tmp_path):
    from mergekit_fw.integration.configs import load_merge_config, pool_and_parameters
    from mergekit_fw.solve.runner import solve_cached

    adapter = tmp_path / "adapter"
    shutil.copytree(random_pool["adapters"][0], adapter)
    config = write_config(tmp_path / "fw.yml", {
        "merge_method": "frank_wolfe",
        "base_model": str(random_pool["base"]),
        "models": [{"model": f"{random_pool['base']}+{adapter}"}, {"model": f"{random_pool['base']}+{random_pool['adapters'][1]}"}],
        "parameters": {"calibration": str(random_pool["calibration"]), "iterations": 2, "cache_dir": str(tmp_path / "cache")},
    })
    first = solve_cached(*pool_and_parameters(load_merge_config(config)), progress=False)
    again = solve_cached(*pool_and_parameters(load_merge_config(config)), progress=False)
    assert again.reused and again.cache_dir == first.cache_dir

    weights_file = adapter / "adapter_model.safetensors"
    weights = load_file(str(weights_file))
    save_file({name: -3 * t if "lora_B" in name else t for name, t in weights.items()}, str(weights_file))
    changed = solve_cached(*pool_and_parameters(load_merge_config(config)), progress=False)
    assert not changed.reused and changed.cache_dir != first.cache_dir
    assert changed.trace.initial_loss == pytest.approx(first.trace.initial_loss)  # same base start
    assert changed.table.weights.tolist() != first.table.weights.tolist()


def test_a_resumed_entropy_solve_decodes_the_same_answers_from_the_same_start(random_pool, tmp_path, monkeypatch):
    """With answer_tokens > 1 the objective depends on answers decoded at the start;
    a solve interrupted after its second iteration and rerun must decode them from
    the starting merge again (not from the checkpoint), ending where an
    uninterrupted solve ends. The start is a stock mergekit merge (an extra vertex)."""
    from mergekit_fw.solve import solver

    base = str(random_pool["base"])
    models = [{"model": f"{base}+{adapter}"} for adapter in random_pool["adapters"]]
    start = write_config(tmp_path / "ta.yml", {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
                                               "models": [{**m, "parameters": {"weight": 0.3}} for m in models]})
    config = write_config(tmp_path / "fw.yml", {
        "merge_method": "frank_wolfe", "base_model": base, "models": models,
        "parameters": {"calibration": str(random_pool["calibration"]), "iterations": 4, "objective": "entropy",
                       "answer_tokens": 3, "init": str(start)},
    })

    _killed_after_two_checkpoints(solver, monkeypatch, lambda: _solve_in(config, tmp_path / "killed", monkeypatch))
    resumed = _solve_in(config, tmp_path / "killed", monkeypatch)
    clean = _solve_in(config, tmp_path / "clean", monkeypatch)
    assert resumed.trace.resumed_at == [2] and clean.trace.resumed_at == []
    assert [it.loss for it in resumed.trace.iterations] == [it.loss for it in clean.trace.iterations]
    assert torch.equal(resumed.table.weights, clean.table.weights)
    assert resumed.trace.passes == clean.trace.passes  # the answers were decoded once, counted once
    assert clean.trace.passes["forward"] >= 2  # 2 decoding passes before the first iteration


def test_a_killed_projected_gradient_solve_resumes_with_its_moments(random_pool, tmp_path, monkeypatch):
    """The projected-gradient solver checkpoints Adam's moments and the start beside the
    table; a solve killed after its second checkpoint and rerun ends on the bits of an
    uninterrupted one, with the same passes spent."""
    from mergekit_fw.solve import stochastic

    base = str(random_pool["base"])
    config = write_config(tmp_path / "fw.yml", {
        "merge_method": "frank_wolfe", "base_model": base,
        "models": [{"model": f"{base}+{adapter}"} for adapter in random_pool["adapters"]],
        "parameters": {"calibration": str(random_pool["calibration"]), "solver": "projected_gradient",
                       "gradient_steps": 25, "constraint": "box", "batch_size": 2},
    })

    calls = _killed_after_two_checkpoints(
        stochastic, monkeypatch, lambda: _solve_in(config, tmp_path / "killed", monkeypatch))
    resumed = _solve_in(config, tmp_path / "killed", monkeypatch)
    clean = _solve_in(config, tmp_path / "clean", monkeypatch)
    assert calls == [10, 20] and resumed.trace.resumed_at == [20] and clean.trace.resumed_at == []
    assert [it.loss for it in resumed.trace.iterations] == [it.loss for it in clean.trace.iterations]
    assert torch.equal(resumed.table.weights, clean.table.weights)
    assert resumed.trace.passes == pytest.approx(clean.trace.passes)
    assert clean.trace.final_loss <= clean.trace.initial_loss


def test_the_base_tokenizer_and_its_chat_template_enter_the_fingerprint(random_pool, tmp_path):
    """The tokens every row is scored on come from the base's tokenizer files: a new
    chat template (or vocabulary) is a new objective, not a cached solve."""
    from mergekit_fw.files import file_fingerprint
    from mergekit_fw.solve.runner import tokenizer_files
    from tests.calibration.helpers import PLAIN_TEMPLATE, with_template

    base = with_template(random_pool["base"], tmp_path / "base", PLAIN_TEMPLATE)
    names = {path.name for path in tokenizer_files(base)}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    before = file_fingerprint(tokenizer_files(base))
    (base / "chat_template.jinja").write_text(PLAIN_TEMPLATE + "{{ eos_token }}")
    assert file_fingerprint(tokenizer_files(base)) != before
