"""The bundled example: build a tiny LoRA pool, merge it with plain `mergekit-yaml`
(task arithmetic and Frank-Wolfe), evaluate base and merges with lm-eval.

    python examples/tiny/run_example.py [--workdir examples/tiny/work] [--seed 0]

Everything is local and deterministic; about two and a half minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
THREADS = int(os.environ.get("MERGEKIT_FW_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
# the pool builder (testbed/) lives in the repository, not in the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from mergekit_fw.evaluation import lm_eval_scores  # noqa: E402
from testbed.asked import build_testbed  # noqa: E402


def mergekit_yaml(config: Path, out: Path, cache: Path | None = None) -> float:
    """Time one ``mergekit-yaml``; ``cache`` (``--lora-merge-cache``) is what stock methods
    need for ``BASE+ADAPTER`` references: frank_wolfe expands no adapter and needs none."""
    start = time.perf_counter()
    cache_args = ["--lora-merge-cache", str(cache)] if cache is not None else []
    subprocess.run(
        ["mergekit-yaml", str(config), str(out), *cache_args, "--quiet"],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(__file__).parent / "work")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="example", choices=["example", "small"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(THREADS)

    work = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)  # mergekit's LoRA cache is keyed by path: never reuse it
    start = time.perf_counter()
    print(f"building the pool in {work} ...", flush=True)
    testbed = build_testbed(work / "pool", size=args.size, seed=args.seed)
    built = time.perf_counter() - start
    cache = work / "lora_merge_cache"
    os.environ["MERGEKIT_FW_CACHE"] = str(work / "fw_cache")
    print("merging with mergekit-yaml: task_arithmetic ...", flush=True)
    t_ta = mergekit_yaml(testbed.root / "ta.yml", work / "out_ta", cache)
    print("merging with mergekit-yaml: frank_wolfe ...", flush=True)
    t_fw = mergekit_yaml(testbed.root / "fw.yml", work / "out_fw")

    tasks = [testbed.lm_eval_task(t) for t in testbed.asked]
    rows = {}
    for label, folder in (("base", testbed.base), ("task_arithmetic", work / "out_ta"), ("frank_wolfe", work / "out_fw")):
        print(f"lm-eval: {label} ...", flush=True)
        rows[label] = lm_eval_scores(folder, tasks, testbed.lm_eval_dir)

    print()
    print(f"held-out exact match (lm-eval), pool: {len(testbed.adapters)} LoRAs, asked tasks: {', '.join(testbed.asked)}")
    header = f"{'model':<18}" + "".join(f"{t:>10}" for t in testbed.asked) + f"{'mean':>10}"
    print(header)
    print("-" * len(header))
    for label, scores in rows.items():
        values = [scores[testbed.lm_eval_task(t)] for t in testbed.asked]
        print(f"{label:<18}" + "".join(f"{v:>10.2f}" for v in values) + f"{sum(values) / len(values):>10.2f}")
    total = time.perf_counter() - start
    print(f"\npool built in {built:.0f}s; mergekit-yaml task_arithmetic {t_ta:.0f}s, frank_wolfe {t_fw:.0f}s; total {total:.0f}s")
    (work / "results.json").write_text(json.dumps({"scores": rows, "seconds": total, "seed": args.seed}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
