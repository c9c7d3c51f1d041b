"""The three ways a merge reaches disk, as subprocesses: ``mergekit-fw run``,
``mergekit-yaml`` (through the start-up hook) and the replay config without the
hook (``mergekit-yaml`` or, after an initial merge, ``mergekit-multi``)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import subprocess_env


def tensors(folder: Path) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _run(argv, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, env=subprocess_env(**env), timeout=600, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} failed:\n{done.stderr[-4000:]}")
    return done


def checkpointed_iterations(cache: Path) -> int:
    """Iterations in a solve's checkpoint under ``cache`` (0 while none is readable)."""
    import json

    for checkpoint in Path(cache).glob("*/fw_checkpoint.json"):
        try:
            return len(json.loads(checkpoint.read_text())["trace"]["iterations"])
        except (ValueError, KeyError):
            return 0
    return 0


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def lora_config(path: Path, base: Path, adapters, calibration: Path, **parameters) -> Path:
    """A ``frank_wolfe`` config over ``BASE+ADAPTER`` members, float32, the given parameters."""
    return write_config(path, {
        "merge_method": "frank_wolfe", "base_model": str(base), "dtype": "float32",
        "models": [{"model": f"{base}+{adapter}"} for adapter in adapters],
        "parameters": {"calibration": str(calibration), **parameters},
    })


def mergekit_fw_run(config: Path, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return _run(["mergekit-fw", "run", str(config), str(out), "--quiet", *args], env)


def mergekit_fw_here(config: Path, out: Path, *args: str, **env: str) -> str:
    """``mergekit-fw run`` inside the test process: the command's own code, options
    and output, without a Python start-up (a subprocess costs about 8 s here, most of
    it importing mergekit and PEFT: CI time). The subprocess stays where the process
    itself is under test: signals, kills, the start-up hook, memory, the entry point."""
    from click.testing import CliRunner

    from mergekit_fw.cli import main

    result = CliRunner().invoke(main, ["run", str(config), str(out), "--quiet", *args], env=env or None)
    if result.exit_code != 0:
        raise AssertionError(f"mergekit-fw run {config} {out} failed ({result.exit_code}):\n{result.output[-4000:]}")
    return result.output


def mergekit_yaml(
    config: Path, out: Path, cache: Path | None = None, *args: str, **env: str
) -> subprocess.CompletedProcess:
    """``mergekit-yaml``; ``cache`` is mergekit's ``--lora-merge-cache``, which stock
    methods over ``BASE+ADAPTER`` references need and ``frank_wolfe`` does not."""
    cache_args = ["--lora-merge-cache", str(cache)] if cache is not None else []
    return _run(["mergekit-yaml", str(config), str(out), *cache_args, "--quiet", *args], env)


def replay(folder: Path, out: Path, cache: Path) -> None:
    """Run the folder's fw_mergekit.yml with the hook off, as its header says."""
    replay_file = folder / "fw_mergekit.yml"
    documents = list(yaml.safe_load_all(replay_file.read_text()))
    if len(documents) == 1:
        mergekit_yaml(replay_file, out, cache, MERGEKIT_FW_AUTOLOAD="0")
    else:
        _run(["mergekit-multi", str(replay_file), "-I", str(out.parent / f"{out.name}-work"), "--out-path", str(out),
              "--lora-merge-cache", str(cache), "--quiet"], {"MERGEKIT_FW_AUTOLOAD": "0"})


def assert_same_tensors(reference: Dict[str, torch.Tensor], *others: Dict[str, torch.Tensor]) -> None:
    for other in others:
        assert set(other) == set(reference)
        for name in reference:
            torch.testing.assert_close(other[name], reference[name], rtol=1e-5, atol=1e-6)
