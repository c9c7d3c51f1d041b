"""SIGINT and SIGTERM end a run cleanly: the finished iterations stay checkpointed,
the lock and the hidden output folder go, one line says how to resume, and the exit
status is the shell's (130 / 143). Signals are sent during the solve and during the
write, to both commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from mergekit_fw.interrupts import RESUME_HINT, Interrupted, signals_raise
from tests.conftest import subprocess_env
from tests.paths import checkpointed_iterations, mergekit_fw_here, write_config


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_raises_inside_the_block_and_the_old_handler_returns(signum):
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as caught, signals_raise():
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler runs at the next bytecode; never reached
    assert caught.value.exit_status == 128 + signum
    assert signal.getsignal(signum) is before


def test_a_plain_keyboard_interrupt_becomes_a_sigint():
    with pytest.raises(Interrupted) as caught, signals_raise():
        raise KeyboardInterrupt
    assert caught.value.exit_status == 130


def _rewrapped_by_c_code(signum: int) -> None:
    """What a safetensors read does when the signal's handler runs inside its torch
    storage callback: the exception is replaced by the library's own ValueError."""
    try:
        os.kill(os.getpid(), signum)
        time.sleep(5)
    except BaseException:
        raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("rewrap", [ValueError, SystemExit])
def test_a_signal_rewrapped_on_its_way_out_is_still_the_signal(rewrap, signum):
    with pytest.raises(Interrupted) as caught, signals_raise():
        try:
            _rewrapped_by_c_code(signum)
        except ValueError as error:  # as the commands turn a bad file into their one-line error
            raise rewrap(f"mergekit-fw: error: {error}") from None
    assert caught.value.exit_status == 128 + signum


@pytest.mark.parametrize("error", [ValueError("a bad file"), SystemExit("mergekit-fw: error: a bad file")])
def test_an_error_with_no_signal_passes_through_unchanged(error):
    with pytest.raises(type(error)) as caught, signals_raise():
        raise error
    assert caught.value is error


def _config(testbed, path: Path, **parameters) -> Path:
    config = yaml.safe_load((testbed.root / "fw.yml").read_text())
    config["parameters"].update(parameters)
    return write_config(path, config)


def _writing(out: Path) -> bool:
    return any(part.is_dir() and any(part.iterdir()) for part in out.parent.glob(f".{out.name}.partial-*"))


def _signal_when(process: subprocess.Popen, ready: Callable[[], bool], signum: int) -> None:
    """Send ``signum`` while ``ready()`` holds: the process is frozen (SIGSTOP) when it
    is first seen to hold, so the signal lands in that phase, not after it."""
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, f"the run ended before the signal: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline
        if ready():
            os.kill(process.pid, signal.SIGSTOP)
            if ready():
                break
            os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.0005)
    os.kill(process.pid, signum)
    os.kill(process.pid, signal.SIGCONT)


def _stopped(process: subprocess.Popen, signum: int) -> str:
    process.wait(timeout=120)
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"stopped by {signal.Signals(signum).name}; {RESUME_HINT}" in stderr
    return stderr


def _start(argv: list[str], cache: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, env=subprocess_env(MERGEKIT_FW_CACHE=str(cache)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _clean(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.lock")) and not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_solve_ends_cleanly_and_the_same_command_resumes(signum, testbed, tmp_path):
    config, cache, out = _config(testbed, tmp_path / "fw.yml", iterations=6), tmp_path / "cache", tmp_path / "out"
    process = _start(["mergekit-fw", "run", str(config), str(out), "--quiet"], cache)
    _signal_when(process, lambda: checkpointed_iterations(cache) >= 2, signum)
    _stopped(process, signum)
    _clean(out)
    kept = checkpointed_iterations(cache)
    assert kept >= 2  # the finished iterations stay
    if signum == signal.SIGINT:
        return  # the rerun is the same after either signal: run once (CI time)

    mergekit_fw_here(config, out, MERGEKIT_FW_CACHE=str(cache))
    trace = json.loads((out / "fw_trace.json").read_text())
    assert trace["resumed_at"] == [kept] and len(trace["iterations"]) == 6


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_write_leaves_no_partial_output_and_the_rerun_reuses_the_solve(signum, testbed, tmp_path):
    config, cache, out = _config(testbed, tmp_path / "fw.yml", iterations=2), tmp_path / "cache", tmp_path / "out"
    # one shard per tensor: the write takes long enough to be caught in the middle
    process = _start(["mergekit-fw", "run", str(config), str(out), "--quiet", "--out-shard-size", "1K"], cache)
    _signal_when(process, lambda: _writing(out), signum)
    _stopped(process, signum)
    _clean(out)
    [table] = cache.glob("*/fw_table.json")  # the solve had finished: it is kept
    solved = table.stat().st_mtime_ns
    if signum == signal.SIGINT:
        return  # the rerun is the same after either signal: run once (CI time)

    mergekit_fw_here(config, out, MERGEKIT_FW_CACHE=str(cache))
    assert table.stat().st_mtime_ns == solved  # reused, not solved again
    written = json.loads((out / "fw_table.json").read_text())
    # the run's copy adds why solver auto chose Frank-Wolfe (the cached solve is shared with runs
    # that named it); the rest is the cached solve's
    assert written["meta"].pop("solver_auto") == "iterations set, which only frank_wolfe reads"
    assert written == json.loads(table.read_text())


@pytest.mark.slow
def test_mergekit_yaml_ends_cleanly_on_sigterm_mid_solve(testbed, tmp_path):
    config, cache, out = _config(testbed, tmp_path / "fw.yml", iterations=6), tmp_path / "cache", tmp_path / "out"
    process = _start(["mergekit-yaml", str(config), str(out), "--quiet"], cache)
    _signal_when(process, lambda: checkpointed_iterations(cache) >= 2, signal.SIGTERM)
    _stopped(process, signal.SIGTERM)
    assert not out.exists()
    assert checkpointed_iterations(cache) >= 2


@pytest.mark.slow
def test_mergekit_yaml_ends_cleanly_on_sigint_mid_write(testbed, tmp_path):
    """mergekit writes into the output folder itself: one the run created is removed."""
    config, cache, out = _config(testbed, tmp_path / "fw.yml", iterations=2), tmp_path / "cache", tmp_path / "out"
    process = _start(["mergekit-yaml", str(config), str(out), "--quiet", "--out-shard-size", "1K"], cache)
    # shards on disk, the index (written when the last shard is) not yet: mid-write
    _signal_when(process, lambda: any(out.glob("*.safetensors")) and not (out / "model.safetensors.index.json").exists(),
                 signal.SIGINT)
    _stopped(process, signal.SIGINT)
    assert not out.exists()
    assert list(cache.glob("*/fw_table.json"))  # the finished solve is kept for the rerun
