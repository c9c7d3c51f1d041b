"""What the screen saves per pass: the oracle's gradient and forward passes with every
adapter of the pool in the model, and with all but ``--keep`` held at 0 (as the screen
holds its dropped members), on the LLaMA-7B-shaped 2-layer base of ``bench_speed``;
then a whole solve at the defaults (``screen_per_task: 2``, two calibration tasks)
against the same solve with ``screen_per_task: 0``.

    python -m evals.bench_screen [--adapters 16] [--keep 4] [--repeats 3] [--root DIR]

Every figure is the median of ``--repeats`` runs within this one run of the script.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from evals.common import THREADS, machine, timed, write_results
from evals.shaped_pool import open_shaped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "mergekit_fw_shaped")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    from mergekit_fw.oracle import Oracle
    from mergekit_fw.solve.solver import solve
    from mergekit_fw.solve.table import CoefficientTable

    shaped = open_shaped(args.root, args.adapters, Path(tempfile.mkdtemp(prefix="bench_screen_")),
                         iterations=args.iterations)
    spec, params, pool, model, calibration = shaped.spec, shaped.params, shaped.pool, shaped.model, shaped.calibration
    results: dict = {"machine": machine(), "adapters": args.adapters, "keep": args.keep, "repeats": args.repeats,
                     "iterations": args.iterations, "dtype": params.oracle_dtype_for(spec.dtype)}

    # 1. one pass, every adapter in the model, then all but the first ``keep`` held at 0
    oracle = Oracle(model, pool, calibration)
    point = torch.zeros(len(pool.candidates), len(oracle.tensors), dtype=torch.float64)
    point[: args.keep] = 0.5
    oracle.evaluate(point)  # warm-up
    for label in ("all", "kept"):
        if label == "kept":
            oracle.hold(range(args.keep, len(pool.candidates)))
        results[f"gradient_{label}_s"], results[f"gradient_{label}_runs"] = timed(
            lambda: oracle.evaluate(point), args.repeats)
        results[f"forward_{label}_s"], results[f"forward_{label}_runs"] = timed(
            lambda: oracle.loss(point), args.repeats)
    results["gradient_ratio"] = results["gradient_kept_s"] / results["gradient_all_s"]
    results["forward_ratio"] = results["forward_kept_s"] / results["forward_all_s"]
    oracle.close()

    # 2. a whole solve at the defaults, with and without the screen (a fresh oracle each)
    start = CoefficientTable.at_base(pool.names, pool.tensor_names(), "bench", str(spec.base))
    for per_task in (0, params.screen_per_task):
        oracle = Oracle(model, pool, calibration)
        began = time.perf_counter()
        _, trace = solve(oracle, copy.deepcopy(start), params.model_copy(update={"screen_per_task": per_task}),
                         progress=False)
        results[f"solve_screen{per_task}_s"] = time.perf_counter() - began
        results[f"solve_screen{per_task}_passes"] = trace.passes
        results[f"solve_screen{per_task}_iterations"] = len(trace.iterations)
        results[f"solve_screen{per_task}_kept"] = len(trace.screen["kept"]) if trace.screen else args.adapters
        oracle.close()
    screened = f"solve_screen{params.screen_per_task}"
    results["solve_ratio"] = results[f"{screened}_s"] / results["solve_screen0_s"]

    m = results["machine"]
    markdown = "\n".join([
        "# What the screen saves per pass",
        "",
        f"`python -m evals.bench_screen --adapters {args.adapters} --keep {args.keep} --repeats {args.repeats}`; "
        f"{m['cpu']}, {m['threads_used']} threads, torch {m['torch']}; LLaMA-7B-shaped 2-layer base, "
        f"{args.adapters} LoRAs on every linear module, {results['dtype']} oracle; medians of {args.repeats}.",
        "",
        f"| pass | {args.adapters} adapters in the model | {args.keep} kept, the rest held | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| gradient (forward + backward to the gates) | {results['gradient_all_s']:.2f} s | "
        f"{results['gradient_kept_s']:.2f} s | {results['gradient_ratio']:.2f} |",
        f"| forward only | {results['forward_all_s']:.2f} s | {results['forward_kept_s']:.2f} s | "
        f"{results['forward_ratio']:.2f} |",
        "",
        f"A solve at the defaults ({args.iterations} iterations at most, 2 calibration tasks):",
        "",
        "| screen_per_task | members kept | iterations | passes (gradient / forward) | seconds |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *(f"| {k} | {results[f'solve_screen{k}_kept']} | {results[f'solve_screen{k}_iterations']} | "
          f"{results[f'solve_screen{k}_passes']['gradient']} / {results[f'solve_screen{k}_passes']['forward']} | "
          f"{results[f'solve_screen{k}_s']:.1f} |" for k in (0, params.screen_per_task)),
        "",
    ])
    write_results("bench_screen", results, markdown)


if __name__ == "__main__":
    main()
