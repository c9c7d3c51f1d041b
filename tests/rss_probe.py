"""Run one soft Frank-Wolfe solve and print its peak RSS (a child process of
tests/test_soft.py, so each pool size is measured in a fresh process)."""

import json
import os
import resource
import sys

import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

from mergekit_fw.integration.configs import load_merge_config, pool_and_parameters  # noqa: E402
from mergekit_fw.solve.runner import solve_cached  # noqa: E402


def main(config_path: str) -> None:
    spec, params = pool_and_parameters(load_merge_config(config_path))
    result = solve_cached(spec, params, progress=False)
    adapter_bytes = sum(c.nbytes() for c in result.pool.candidates if c.kind == "lora")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_bytes": peak_kib * 1024, "adapter_bytes": adapter_bytes,
                      "iterations": len(result.trace.iterations)}))


if __name__ == "__main__":
    main(sys.argv[1])
