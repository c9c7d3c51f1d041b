"""A built pool set up for some asked tasks: the calibration file of those tasks,
and ``fw.yml`` / ``ta.yml`` over the whole pool (what the tests and the bundled
example merge)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

import yaml

from testbed.build import SIZES, Pool, PoolSize, build_pool
from testbed.data import calibration_file, lm_eval_name
from testbed.tasks import BY_NAME

# The small pool's asked pair: two families (string, arithmetic) whose LoRAs merge at 0.5
# each keeping 0.89 and 0.96 of their own gains (seed 0). reverse + sort keeps only 0.46
# of sort's there (a fact about that pair's interference, measured before any FW run).
ASKED = ("reverse", "shiftup")


@dataclass
class Testbed:
    root: Path
    base: Path
    adapters: Dict[str, Path]  # task -> its own LoRA
    calibration: Path
    eval_files: Dict[str, Path]
    lm_eval_dir: Path
    asked: Tuple[str, ...]
    irrelevant: Tuple[str, ...]
    pool: Pool = field(repr=False)

    def reference(self, task: str) -> str:
        """mergekit's reference string for the task's LoRA (``BASE+ADAPTER``)."""
        return f"{self.base}+{self.adapters[task]}"

    def lm_eval_task(self, task: str) -> str:
        return lm_eval_name(BY_NAME[task])


def set_up(pool: Pool, asked: Sequence[str] = ASKED, *, iterations: int = 10, ta_weight: float = 0.3) -> Testbed:
    """The asked tasks' calibration rows and the two configs, written beside the pool."""
    adapters = {c["task"]: Path(c["path"]) for c in pool.candidates if c["kind"] == "lora" and c["role"] == "task"}
    calibration = calibration_file(pool.root / "calib.jsonl", pool.files, asked, pool.size.data.calib)
    testbed = Testbed(
        root=pool.root,
        base=pool.base,
        adapters=adapters,
        calibration=calibration,
        eval_files={t: pool.files[t].test for t in pool.size.tasks},
        lm_eval_dir=pool.lm_eval_dir,
        asked=tuple(asked),
        irrelevant=tuple(t for t in adapters if t not in asked),
        pool=pool,
    )
    write_configs(testbed, iterations=iterations, ta_weight=ta_weight)
    return testbed


def build_testbed(
    root: Path, *, size: Union[str, PoolSize] = "example", seed: int = 0, asked: Sequence[str] = ASKED
) -> Testbed:
    """Build (or reuse) the pool under ``root`` and set it up for ``asked``."""
    return set_up(build_pool(root, SIZES[size] if isinstance(size, str) else size, seed), asked)


def write_configs(testbed: Testbed, *, iterations: int = 10, ta_weight: float = 0.3) -> None:
    """fw.yml (Frank-Wolfe) and ta.yml (task arithmetic) over the same pool."""
    models = [{"model": testbed.reference(t)} for t in (*testbed.asked, *testbed.irrelevant)]
    fw = {
        "merge_method": "frank_wolfe",
        "base_model": str(testbed.base),
        "models": models,
        "parameters": {
            "calibration": str(testbed.calibration),
            "samples_per_task": 100,
            "variant": "hard",
            "lmo": "layer",
            "iterations": iterations,
            # whole candidates, so the merge has a stock replay config (the example and the
            # end-to-end tests check all three paths); with 100 rows a task, granularity
            # auto (the default) would weigh each LoRA rank component apart, which has none
            "granularity": "candidate",
        },
        "dtype": "float32",
    }
    ta = {
        "merge_method": "task_arithmetic",
        "base_model": str(testbed.base),
        "models": [{**m, "parameters": {"weight": ta_weight}} for m in models],
        "dtype": "float32",
    }
    (testbed.root / "fw.yml").write_text(yaml.safe_dump(fw, sort_keys=False))
    (testbed.root / "ta.yml").write_text(yaml.safe_dump(ta, sort_keys=False))
