"""Soft Frank-Wolfe on the trained tiny pool: monotone, feasible, flat in memory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergekit_fw.config import parse_parameters
from mergekit_fw.integration.configs import load_merge_config, pool_and_parameters
from mergekit_fw.solve.simplex import check_feasible
from tests.conftest import subprocess_env
from tests.paths import write_config

pytestmark = pytest.mark.slow


def _soft(testbed, **overrides):
    merge_config = load_merge_config(testbed.root / "fw.yml")
    spec, _ = pool_and_parameters(merge_config)
    raw = {"calibration": str(testbed.calibration), "samples_per_task": 30, "variant": "soft", "iterations": 4,
           "constraint": "hull",
           "top_k": 2, "inner_steps": 4, **overrides}
    return spec, parse_parameters(raw)


@pytest.mark.parametrize("overrides", [{}, {"top_k_per": "task", "inner_weights": "task", "lmo": "task"}])
def test_soft_fw_never_raises_the_loss_and_stays_feasible(testbed, overrides):
    from mergekit_fw.calibration.batches import build_calibration
    from mergekit_fw.distributed import Processes
    from mergekit_fw.oracle import Oracle
    from mergekit_fw.pool.pool import open_pool
    from mergekit_fw.solve.init import starting_point
    from mergekit_fw.solve.runner import load_base_model
    from mergekit_fw.solve.solver import solve

    spec, params = _soft(testbed, **overrides)
    pool = open_pool(spec)
    model, tokenizer = load_base_model(pool, params, Processes())
    calibration = build_calibration(testbed.calibration, tokenizer, samples_per_task=params.samples_per_task,
                                    batch_size=params.batch_size, max_length=params.max_length)
    start = starting_point(params, spec, pool, "test", Path("unused"))
    oracle = Oracle(model, start.pool, calibration)
    seen = []
    table, trace = solve(oracle, start.table, params, progress=False,
                         on_iteration=lambda t, record: seen.append((t.weights.clone(), record)))
    assert len(seen) >= 2
    for weights, record in seen:
        check_feasible(weights)  # the paper's hull, named in _soft
        assert record.loss_after <= record.loss
        assert abs(record.loss_after - oracle.loss(weights[1:])) < 1e-6  # the recorded loss is the iterate's
        if overrides:
            assert record.points >= 2  # the union of both tasks' top-k
    assert trace.final_loss < trace.initial_loss - 0.1


def _random_adapters(base: Path, root: Path, count: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    folders = []
    for index in range(count):
        torch.manual_seed(500 + index)
        model = get_peft_model(
            LlamaForCausalLM.from_pretrained(str(base)),
            LoraConfig(r=64, lora_alpha=16, init_lora_weights=False,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)
        folder = root / f"random{index}"
        model.save_pretrained(str(folder))
        folders.append(folder)
    return folders


def test_peak_rss_grows_only_by_the_adapters_bytes(testbed, tmp_path):
    """4 vs 16 adapters: peak RSS differs by the extra adapters' bytes plus 4 MiB.

    Each size runs in a fresh process (tests/rss_probe.py reads its own peak).
    glibc's malloc raises its mmap threshold as large blocks are freed and then
    keeps freed transient buffers in its heap, so the peak would measure
    allocator history; the probes pin the threshold at its default, 128 KiB.
    """
    extra = _random_adapters(testbed.base, tmp_path, 12)
    four = [{"model": testbed.reference(t)} for t in (*testbed.asked, *testbed.irrelevant[:2])]
    parameters = {"calibration": str(testbed.calibration), "samples_per_task": 20, "batch_size": 4, "variant": "soft",
                  "top_k": 2, "iterations": 2, "inner_steps": 3}
    peaks = {}
    for size, models in ((4, four), (16, four + [{"model": f"{testbed.base}+{f}"} for f in extra])):
        config = write_config(tmp_path / f"fw{size}.yml", {
            "merge_method": "frank_wolfe", "base_model": str(testbed.base), "models": models,
            "parameters": parameters, "dtype": "float32",
        })
        done = subprocess.run(
            [sys.executable, str(Path(__file__).parents[1] / "rss_probe.py"), str(config)],
            env=subprocess_env(MALLOC_MMAP_THRESHOLD_="131072", MERGEKIT_FW_CACHE=str(tmp_path / f"cache{size}")),
            capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[size] = json.loads(done.stdout.strip().splitlines()[-1])
    grew = peaks[16]["peak_bytes"] - peaks[4]["peak_bytes"]
    adapters = peaks[16]["adapter_bytes"] - peaks[4]["adapter_bytes"]
    assert adapters > 4 * 2**20  # the extra adapters are big enough to see
    assert grew <= adapters + 4 * 2**20, (grew, adapters, peaks)
