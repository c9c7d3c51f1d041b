"""Accelerate data parallel: two CPU processes (gloo) split the calibration batches
and write the single-process table; only the first process writes."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
import torch
import yaml

from tests.conftest import subprocess_env
from tests.paths import assert_same_tensors, mergekit_fw_here, tensors, write_config

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_the_single_process_table(testbed, tmp_path):
    config = yaml.safe_load((testbed.root / "fw.yml").read_text())
    # soft FW with per-task top-k: reduces losses, scores and per-task scores
    config["parameters"].update({"variant": "soft", "top_k_per": "task", "iterations": 3, "inner_steps": 3, "batch_size": 8})
    fw = write_config(tmp_path / "fw.yml", config)

    # Accelerate 1.x's --cpu launcher starts one process unless MPI is installed;
    # --multi_gpu goes through torch.distributed.run and falls back to gloo on CPUs.
    argv = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()),
            "-m", "mergekit_fw.cli", "run", str(fw), str(tmp_path / "parallel"), "--quiet", "--threads", "1", "-v"]
    done = subprocess.run(argv, env=subprocess_env(OMP_NUM_THREADS="1", MERGEKIT_FW_CACHE=str(tmp_path / "cache_p")),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "process 1 of 2" in done.stderr and "process 0 of 2" in done.stderr
    assert done.stdout.count("merged model written") == 1  # only the main process wrote

    mergekit_fw_here(fw, tmp_path / "single", MERGEKIT_FW_CACHE=str(tmp_path / "cache_s"))
    parallel = json.loads((tmp_path / "parallel" / "fw_table.json").read_text())
    single = json.loads((tmp_path / "single" / "fw_table.json").read_text())
    assert parallel["candidates"] == single["candidates"]
    assert parallel["weights"].keys() == single["weights"].keys()
    for tensor, weights in single["weights"].items():
        torch.testing.assert_close(torch.tensor(parallel["weights"][tensor]), torch.tensor(weights), rtol=1e-5, atol=1e-7)
    trace_p = json.loads((tmp_path / "parallel" / "fw_trace.json").read_text())
    trace_s = json.loads((tmp_path / "single" / "fw_trace.json").read_text())
    assert len(trace_p["iterations"]) == len(trace_s["iterations"]) >= 2
    assert trace_p["final_loss"] == pytest.approx(trace_s["final_loss"], rel=1e-6)
    assert_same_tensors(tensors(tmp_path / "single"), tensors(tmp_path / "parallel"))
    assert not list(tmp_path.glob(".parallel.partial*"))
