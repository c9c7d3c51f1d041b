"""Peak RSS of ``mergekit-fw run`` against the pool's size, and of mergekit's own
``task_arithmetic`` over ``BASE+LORA`` references, on a LLaMA-7B-shaped 2-layer base.

    python -m evals.bench_memory [--sizes 4 16 64] [--mergekit-sizes 4 16] [--root DIR]

Each run is a fresh process (fresh solve cache), measured by GNU time's maximum
resident set size. ``mergekit-fw run`` is measured with glibc's default malloc and
with its mmap threshold pinned at the default 128 KiB (``MALLOC_MMAP_THRESHOLD_``):
glibc otherwise raises the threshold as big buffers are freed and keeps later
transients in its heap, which shows up as RSS that no live tensor holds. The
claim checked: peak(n) <= 1.1 x peak(4) + the extra adapters' bytes. mergekit's
path expands every adapter into a full model copy in ``--lora-merge-cache``
(1.3 GB each here), so its largest size is limited by disk.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import yaml

from evals.common import RESULTS, child_env, machine, measured, mib, write_results
from evals.shaped_pool import build_pool, fw_config, task_arithmetic_config


def adapter_bytes(adapters) -> int:
    return sum((Path(a) / "adapter_model.safetensors").stat().st_size for a in adapters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--mergekit-sizes", type=int, nargs="*", default=[4, 16])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "mergekit_fw_shaped")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    rows = []
    for n in sorted(set(args.sizes) | set(args.mergekit_sizes)):
        pool = build_pool(args.root, n)
        row = {"adapters": n, "adapter_bytes": adapter_bytes(pool["adapters"])}
        if n in args.sizes:
            config = work / f"fw{n}.yml"
            config.write_text(yaml.safe_dump(fw_config(pool, iterations=2, step="schedule", gradient_checkpointing=True,
                                                           screen_per_task=0)))  # the whole pool in play
            for label, extra in (("fw", {}), ("fw_pinned", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
                cache, out = work / f"cache-{label}-{n}", work / f"out-{label}-{n}"
                argv = ["mergekit-fw", "run", str(config), str(out), "--quiet", "--threads", "2"]
                row[f"{label}_peak"], row[f"{label}_seconds"] = measured(argv, child_env(MERGEKIT_FW_CACHE=str(cache), **extra))
                shutil.rmtree(out), shutil.rmtree(cache)
        if n in args.mergekit_sizes:
            config = work / f"ta{n}.yml"
            config.write_text(yaml.safe_dump(task_arithmetic_config(pool)))
            cache, out = work / f"lora-cache-{n}", work / f"out-ta-{n}"
            argv = ["mergekit-yaml", str(config), str(out), "--lora-merge-cache", str(cache), "--quiet"]
            row["mergekit_peak"], row["mergekit_seconds"] = measured(argv, child_env())
            row["mergekit_lora_cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
            shutil.rmtree(out), shutil.rmtree(cache)
        rows.append(row)
        print(row, flush=True)
    shutil.rmtree(work, ignore_errors=True)

    smallest = next((r for r in rows if "fw_peak" in r), None)
    lines = [
        "# Peak RSS against pool size (LLaMA-7B-shaped base, 2 layers, bf16)",
        "",
        "`python -m evals.bench_memory`; one fresh process per cell, GNU time's max RSS. "
        "Base: hidden 4096, intermediate 11008, 32 heads, vocab 32000, 2 layers (0.67 B parameters, "
        "1.3 GB bf16). Adapters: PEFT LoRAs on all 7 linear modules, ranks 8/16/32/16 cycled, fp32 "
        "factors. `mergekit-fw run`: 2 iterations (`step: schedule`), `oracle_dtype: bfloat16`, "
        "`gradient_checkpointing: true`, 8 calibration sequences of ~35 tokens, bf16 output. "
        "mergekit: `task_arithmetic` (weight 0.3) over `BASE+LORA` references with a fresh "
        "`--lora-merge-cache`.",
        "",
        f"Machine: {machine()}",
        "",
        "| adapters | adapter MiB | mergekit-fw MiB | pinned malloc MiB | claim (pinned) | mergekit-fw s | mergekit TA MiB | mergekit TA s | LoRA cache MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        claim = ""
        if smallest is not None and "fw_pinned_peak" in r:
            bound = 1.1 * smallest["fw_pinned_peak"] + (r["adapter_bytes"] - smallest["adapter_bytes"])
            r["claim_bound"] = bound
            r["claim_holds"] = r["fw_pinned_peak"] <= bound
            claim = f"{'holds' if r['claim_holds'] else 'FAILS'} (<= {mib(bound)})"
        cell = lambda key: mib(r[key]) if key in r else "not run"  # noqa: E731
        secs = lambda key: f"{r[key]:.0f}" if key in r else "not run"  # noqa: E731
        lines.append(
            f"| {r['adapters']} | {mib(r['adapter_bytes'])} | {cell('fw_peak')} | {cell('fw_pinned_peak')} | {claim} | "
            f"{secs('fw_seconds')} | {cell('mergekit_peak')} | {secs('mergekit_seconds')} | {cell('mergekit_lora_cache_bytes')} |"
        )
    markdown = "\n".join(lines) + "\n"
    write_results("bench_memory", {"machine": machine(), "rows": rows}, markdown)
    plot(rows, RESULTS / "bench_memory.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("fw_peak", "mergekit-fw run"), ("fw_pinned_peak", "mergekit-fw run (pinned malloc)"),
                       ("mergekit_peak", "mergekit task_arithmetic, BASE+LORA")):
        points = [(r["adapters"], r[key] / 2**30) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapters in the pool")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("LLaMA-7B-shaped base, 2 layers, bf16")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
