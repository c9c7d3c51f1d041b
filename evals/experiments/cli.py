"""The command line every experiment module shares."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Callable

from evals.experiments.common import Context, open_context


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="the quick testbed and reduced grids")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="pool, caches and records (default: a temp folder per size and seed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args


def main(run: Callable[[Context], Path]) -> None:
    args = arguments((run.__module__ and __import__(run.__module__, fromlist=["_"]).__doc__ or "").split("\n")[0])
    started = time.perf_counter()
    ctx = open_context("quick" if args.quick else "full", args.seed, args.work)
    path = run(ctx)
    print(path.read_text())
    print(f"({time.perf_counter() - started:.0f} s)")
