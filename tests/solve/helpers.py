"""A random pool's configs with enough calibration rows on every task for ``auto`` to split
its LoRAs into rank components: the set-up the auto rules' end-to-end tests share."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mergekit_fw.integration.configs import load_merge_config, pool_and_parameters
from mergekit_fw.solve.granularity import RANK_ROWS
from tests.paths import write_config


def rank_rows_configs(random_pool: dict, folder: Path, **shared) -> tuple[Callable[..., Path], Callable[..., tuple]]:
    """``write(name, **parameters)``: a frank_wolfe config file in ``folder`` on ``RANK_ROWS``
    rows of each of two tasks, one solve cache for all (``shared`` in every config);
    ``config(name, **parameters)``: the same file read as mergekit-fw reads it."""
    calibration = folder / "calib.jsonl"
    with calibration.open("w") as handle:
        for task in ("reverse", "sort"):
            for i in range(RANK_ROWS):
                handle.write(json.dumps({"task": task, "prompt": f"{task} a b", "completion": "= b a"[: 2 + i % 4]}) + "\n")
    models = [{"model": f"{random_pool['base']}+{p}"} for p in random_pool["adapters"]]

    def write(name: str, **parameters) -> Path:
        return write_config(folder / name, {
            "merge_method": "frank_wolfe", "base_model": str(random_pool["base"]), "models": models, "dtype": "float32",
            "parameters": {"calibration": str(calibration), "cache_dir": str(folder / "cache"), **shared,
                           **parameters}})

    def config(name: str, **parameters) -> tuple:
        return pool_and_parameters(load_merge_config(write(name, **parameters)))

    return write, config
