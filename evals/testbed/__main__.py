"""Build the evidence pool and check that it measures something.

    python -m evals.testbed [--size quick|full] [--seed 0] [--root DIR]

Writes ``evals/results/testbed_<size>.md`` and ``.json``: per asked task, the base,
the task's own adapter, and the relevant adapters merged alone.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from evals.common import THREADS, machine, write_results
from testbed.build import SIZES, build_pool
from testbed.sanity import markdown, sanity_table

ASKED = {"quick": ("reverse", "sort", "shiftup", "firstbigger"), "full": ("reverse", "sort", "cipher", "firstbigger")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(THREADS)
    root = args.root or Path(tempfile.gettempdir()) / f"mergekit_fw_testbed_{args.size}_{args.seed}"
    started = time.perf_counter()
    pool = build_pool(root, SIZES[args.size], args.seed)
    built = time.perf_counter() - started
    table = sanity_table(pool, ASKED[args.size])
    title = f"Testbed ({args.size}, seed {args.seed}): do the relevant adapters merge?"
    text = markdown(table, title) + (
        f"\nBuilt in {built:.0f} s (cached builds are reused); machine: {machine()}.\n"
        "Scores: greedy exact match (generation tasks) or accuracy of the most likely choice, "
        "in process, on each task's held-out test rows.\n"
    )
    write_results(f"testbed_{args.size}", {"size": args.size, "seed": args.seed, "rows": table, "build_seconds": built,
                                          "machine": machine()}, text)


if __name__ == "__main__":
    main()
