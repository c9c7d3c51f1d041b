"""What the benchmarks share: child processes measured by ``/usr/bin/time``, the
machine's description and the results folder."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2


def child_env(**extra: str) -> Dict[str, str]:
    """One process at a time, each with the same explicit thread budget, offline."""
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def measured(argv: Sequence[str], env: Dict[str, str]) -> Tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of one child process, from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        done = subprocess.run(["/usr/bin/time", "-f", "%M %e", "-o", report.name, *argv], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
        kib, seconds = Path(report.name).read_text().split()[-2:]
    return int(kib) * 1024, float(seconds)


def machine() -> Dict[str, object]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "threads_used": THREADS, "memory_gib": round(memory / 2**30, 1),
            "python": sys.version.split()[0], "torch": torch.__version__, "gpu": torch.cuda.is_available()}


def median(values: List[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object], repeats: int) -> Tuple[float, List[float]]:
    """The median of ``repeats`` runs of ``fn`` in seconds, and every run's."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times), times


def write_results(name: str, data: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"
