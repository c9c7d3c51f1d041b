"""Time of a Frank-Wolfe iteration, of the fast path's output write and of the
whole fast path against mergekit's ``BASE+LORA`` path, on a LLaMA-7B-shaped
2-layer base with 16 adapters.

    python -m evals.bench_speed [--repeats 3] [--root DIR]

1. One FW iteration (oracle: forward + backward to the gates, LMO, a
   ``step: schedule`` step) against one bare forward + backward of the base
   (weight gradients, as a training step computes them) over the same
   calibration batches, same dtype. Target ratio <= 1.3. Searched steps: a
   golden-section iteration (8 forward passes) and a quadratic-step iteration
   (usually 2, from the slope the scores give); target for the latter <= 1.3.
2. The fast path's write (untouched tensors copied, touched ones computed in
   row blocks with one GEMM over the stacked low-rank factors) against a plain
   copy of the base's safetensors file. Target ratio <= 1.5. Also timed: the
   same against an fsynced copy (the writer fsyncs before publishing), the write
   when only q_proj/v_proj are moved (the commonest community LoRA), and the
   fp32 GEMMs alone (the arithmetic floor of the write on this machine).
3. ``mergekit-yaml`` against ``mergekit-fw run`` on the same ``frank_wolfe``
   config, the solve already cached for both (so the path is what is timed: under
   the hook mergekit plans over the base alone and expands no adapter, so no
   ``--lora-merge-cache`` is given). Target: ``mergekit-yaml`` within 1.2x.

Every figure is the median of ``--repeats`` runs within this one run of the script.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch

from evals.common import THREADS, child_env, machine, measured, median, timed, write_results
from evals.shaped_pool import open_shaped


def _only_tensors(table, modules):
    """The table with every tensor outside ``modules`` set back to the base: the
    writer's work for a pool of adapters that only target those modules."""
    weights = table.weights.clone()
    for column, name in enumerate(table.tensors):
        if not any(f".{module}." in name for module in modules):
            weights[:, column] = 0.0
            weights[0, column] = 1.0
    return type(table)(table.candidates, table.tensors, weights, table.fingerprint, table.base_model)


def _low_rank_products(pool, table) -> None:
    """Only the arithmetic floor of the write: each touched tensor's stacked
    fp32 GEMM, no reading of the base, no conversion, no I/O."""
    coefficients = table.coefficient_map()
    for name in table.tensors:
        loras = [(c.factors[name], coefficients[name][c.name]) for _, c in pool.lora_candidates()
                 if coefficients[name].get(c.name, 0.0) != 0.0 and name in c.factors]
        if loras:
            B = torch.cat([f.B * (w * f.scale) for f, w in loras], dim=1)
            A = torch.cat([f.A for f, _ in loras], dim=0)
            B @ A


def _touched_fraction(pool, table) -> float:
    """Share of the base's bytes the writer has to compute rather than copy."""
    from mergekit_fw.output.writer import contributors

    coefficients = table.coefficient_map()
    total = touched = 0
    for name in pool.base_index.names():
        size = pool.base_index.stored(name).nbytes
        total += size
        touched += size if contributors(pool, coefficients.get(name), name) else 0
    return touched / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "mergekit_fw_shaped")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    from mergekit_fw.objective import batch_loss, position_weights
    from mergekit_fw.oracle import Oracle
    from mergekit_fw.output.writer import write_merged_model
    from mergekit_fw.solve.solver import solve
    from mergekit_fw.solve.table import CoefficientTable

    work = Path(tempfile.mkdtemp(prefix="bench_speed_"))
    # every adapter in play (screen_per_task: 0): an iteration over the whole pool, what the
    # screen costs when it keeps everyone (evals.bench_screen times what it saves otherwise)
    shaped = open_shaped(args.root, args.adapters, work, iterations=3, step="schedule", screen_per_task=0)
    pool_dirs, config_file, spec, params = shaped.dirs, shaped.config_file, shaped.spec, shaped.params
    pool, model, calibration = shaped.pool, shaped.model, shaped.calibration
    tokens = int(sum(int(b.attention_mask.sum()) for b in calibration.batches))
    results: dict = {"machine": machine(), "adapters": args.adapters, "repeats": args.repeats,
                     "calibration_tokens": tokens, "dtype": params.oracle_dtype_for(spec.dtype)}

    # 1a. bare forward + backward of the base
    weights = position_weights(calibration)
    for p in model.parameters():
        p.requires_grad_(True)

    def bare() -> None:
        for batch in calibration.batches:
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            batch_loss(out.logits, batch, weights, calibration.objective).backward()
        model.zero_grad(set_to_none=True)

    bare()  # warm-up
    results["bare_fwd_bwd_s"], results["bare_runs"] = timed(bare, args.repeats)
    for p in model.parameters():
        p.requires_grad_(False)

    # 1b. one FW iteration
    oracle = Oracle(model, pool, calibration)
    start = CoefficientTable.at_base(pool.names, pool.tensor_names(), "bench", str(spec.base))
    one = params.model_copy(update={"iterations": 1})
    searched = params.model_copy(update={"iterations": 1, "step": "line_search"})
    fitted = params.model_copy(update={"iterations": 1, "step": "quadratic"})
    run = lambda p: solve(oracle, copy.deepcopy(start), p, progress=False)  # noqa: E731
    run(one)  # warm-up
    results["fw_iteration_s"], results["fw_iteration_runs"] = timed(lambda: run(one), args.repeats)
    results["fw_line_search_iteration_s"], results["fw_line_search_runs"] = timed(lambda: run(searched), args.repeats)
    results["fw_quadratic_iteration_s"], results["fw_quadratic_runs"] = timed(lambda: run(fitted), args.repeats)
    results["fw_quadratic_forwards"] = run(fitted)[1].iterations[0].passes["forward"]
    results["quadratic_iteration_ratio"] = results["fw_quadratic_iteration_s"] / results["bare_fwd_bwd_s"]
    results["iteration_ratio"] = results["fw_iteration_s"] / results["bare_fwd_bwd_s"]
    table, _ = solve(oracle, copy.deepcopy(start), params, progress=False)
    oracle.close()

    # 2. output write vs plain copy
    base_file = Path(pool_dirs["base"]) / "model.safetensors"
    out = work / "written"

    def write() -> None:
        write_merged_model(pool, table, out, dtype=torch.bfloat16, progress=False)
        shutil.rmtree(out)

    def plain_copy() -> None:
        shutil.copyfile(base_file, work / "copy.safetensors")
        (work / "copy.safetensors").unlink()

    def plain_copy_synced() -> None:  # the writer fsyncs before publishing; so does this
        shutil.copyfile(base_file, work / "copy.safetensors")
        with open(work / "copy.safetensors", "rb") as handle:
            os.fsync(handle.fileno())
        (work / "copy.safetensors").unlink()

    qv_table = _only_tensors(table, ("q_proj", "v_proj"))
    qv_out = work / "written-qv"

    def write_qv() -> None:
        write_merged_model(pool, qv_table, qv_out, dtype=torch.bfloat16, progress=False)
        shutil.rmtree(qv_out)

    plain_copy()  # the base file is in the page cache for all
    results["plain_copy_s"], results["plain_copy_runs"] = timed(plain_copy, args.repeats)
    results["plain_copy_fsync_s"], results["plain_copy_fsync_runs"] = timed(plain_copy_synced, args.repeats)
    results["write_s"], results["write_runs"] = timed(write, args.repeats)
    results["write_ratio"] = results["write_s"] / results["plain_copy_s"]
    results["write_qv_s"], results["write_qv_runs"] = timed(write_qv, args.repeats)
    results["write_qv_ratio"] = results["write_qv_s"] / results["plain_copy_s"]
    _low_rank_products(pool, table)  # reads the factors once; the timed runs do arithmetic only
    results["lowrank_gemm_s"], results["lowrank_gemm_runs"] = timed(lambda: _low_rank_products(pool, table), args.repeats)
    results["touched_fraction"] = _touched_fraction(pool, table)
    results["touched_fraction_qv"] = _touched_fraction(pool, qv_table)

    # 3. whole paths, the solve cached for both
    cache = work / "solve-cache"
    env = child_env(MERGEKIT_FW_CACHE=str(cache))
    fast_argv = ["mergekit-fw", "run", str(config_file), str(work / "fast"), "--quiet", "--threads", str(THREADS)]
    measured(fast_argv, env)  # solves once and fills the cache
    shutil.rmtree(work / "fast")
    fast_runs, mergekit_runs = [], []
    for _ in range(args.repeats):
        fast_runs.append(measured(fast_argv, env)[1])
        shutil.rmtree(work / "fast")
        argv = ["mergekit-yaml", str(config_file), str(work / "slow"), "--quiet"]
        mergekit_runs.append(measured(argv, env)[1])
        shutil.rmtree(work / "slow")
    results["fast_path_s"], results["fast_path_runs"] = median(fast_runs), fast_runs
    results["mergekit_path_s"], results["mergekit_path_runs"] = median(mergekit_runs), mergekit_runs
    results["path_speedup"] = results["mergekit_path_s"] / results["fast_path_s"]
    shutil.rmtree(work, ignore_errors=True)

    r = results
    verdict = lambda ok: "meets" if ok else "MISSES"  # noqa: E731
    markdown = "\n".join([
        f"# Speed on a LLaMA-7B-shaped base (2 layers, bf16), {args.adapters} adapters",
        "",
        f"`python -m evals.bench_speed`; medians of {args.repeats} runs each, in one run of the script. "
        f"Calibration: {len(calibration.batches)} batches, {tokens} tokens. Oracle dtype {r['dtype']}, "
        "no gradient checkpointing.",
        "",
        f"Machine: {r['machine']}",
        "",
        "| measure | seconds | against | ratio | target |",
        "| --- | --- | --- | --- | --- |",
        f"| FW iteration (`step: schedule`) | {r['fw_iteration_s']:.2f} | bare fwd+bwd {r['bare_fwd_bwd_s']:.2f} s | "
        f"{r['iteration_ratio']:.2f} | <= 1.3: {verdict(r['iteration_ratio'] <= 1.3)} |",
        f"| FW iteration (`step: line_search`, 8 evaluations) | {r['fw_line_search_iteration_s']:.2f} | bare fwd+bwd "
        f"{r['bare_fwd_bwd_s']:.2f} s | {r['fw_line_search_iteration_s'] / r['bare_fwd_bwd_s']:.2f} | (not a target) |",
        f"| FW iteration (`step: quadratic`, {r['fw_quadratic_forwards']} evaluations) | "
        f"{r['fw_quadratic_iteration_s']:.2f} | bare fwd+bwd {r['bare_fwd_bwd_s']:.2f} s | "
        f"{r['quadratic_iteration_ratio']:.2f} | <= 1.3: {verdict(r['quadratic_iteration_ratio'] <= 1.3)} |",
        f"| fast-path write, bf16, all 7 modules ({100 * r['touched_fraction']:.0f}% of the bytes computed) | "
        f"{r['write_s']:.2f} | plain copy of the base file {r['plain_copy_s']:.2f} s | "
        f"{r['write_ratio']:.2f} | <= 1.5: {verdict(r['write_ratio'] <= 1.5)} |",
        f"| same, against a copy that is fsynced (the writer fsyncs) | {r['write_s']:.2f} | "
        f"{r['plain_copy_fsync_s']:.2f} s | {r['write_s'] / r['plain_copy_fsync_s']:.2f} | (not a target) |",
        f"| fast-path write, only q_proj/v_proj moved ({100 * r['touched_fraction_qv']:.0f}% computed) | "
        f"{r['write_qv_s']:.2f} | plain copy {r['plain_copy_s']:.2f} s | {r['write_qv_ratio']:.2f} | "
        f"<= 1.5: {verdict(r['write_qv_ratio'] <= 1.5)} |",
        f"| of which unavoidable: the fp32 low-rank GEMMs alone (all 7 modules) | {r['lowrank_gemm_s']:.2f} | "
        f"plain copy {r['plain_copy_s']:.2f} s | {r['lowrank_gemm_s'] / r['plain_copy_s']:.2f} | (floor) |",
        f"| `mergekit-yaml` (solve cached, no LoRA cache) | {r['mergekit_path_s']:.1f} | `mergekit-fw run` "
        f"{r['fast_path_s']:.1f} s | {r['path_speedup']:.2f}x | <= 1.2x: {verdict(r['path_speedup'] <= 1.2)} |",
        "",
    ])
    write_results("bench_speed", results, markdown)


if __name__ == "__main__":
    main()
