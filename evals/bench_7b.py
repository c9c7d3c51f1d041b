"""``mergekit-yaml fw.yml out/`` and ``mergekit-fw run fw.yml out/`` at the real scale:
a Llama-2-7B-shaped base at full depth and 16 adapters in the shapes community pools
have, end to end, one fresh process each; and mergekit's own ``task_arithmetic`` over
the same ``BASE+LORA`` references at the largest pool this disk holds.

    python -m evals.bench_7b [--layers 32] [--adapters 16] [--root DIR] [--device cpu|cuda]

Per stage (start-up and pool check, model load, each iteration, write): seconds, peak
RSS and bytes written, from the process's own stage marks (``-v`` log lines, stamped
as they arrive), ``/proc/PID/status`` sampled every 50 ms and ``/proc/PID/io``. Each
iteration's oracle / LMO / step seconds come from the run's ``fw_trace.json``. On a
GPU, each command's ``torch.cuda.max_memory_allocated`` is read at its exit.

Weights are seeded random (``evals/shaped_pool.py``): this measures time, memory and
disk, never quality. Not in CI (about 30 GB of disk and 14 GB of memory).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import yaml

from evals.common import child_env, machine, mib, write_results
from evals.shaped_pool import TARGETS, AdapterShape, build_adapter, build_base, write_calibration

HUB_SHARD_BYTES = 10 * 10**9  # Llama-2-7b-hf: two safetensors shards, the first 9.98 GB
QV = ("q_proj", "v_proj")
# 16 adapters as community Llama-2 pools come: q/v at r 8 and 16 (the QLoRA recipe),
# all linear modules at r 16 and 64, one rsLoRA, one that retrains lm_head, fp16 and fp32 files.
COMMUNITY_SHAPES: Tuple[AdapterShape, ...] = (
    *(AdapterShape(QV, 8, torch.float16) for _ in range(3)),
    *(AdapterShape(QV, 8, torch.float32) for _ in range(2)),
    *(AdapterShape(QV, 16, torch.float16) for _ in range(2)),
    *(AdapterShape(QV, 16, torch.float32) for _ in range(2)),
    *(AdapterShape(TARGETS, 16, torch.float16) for _ in range(2)),
    AdapterShape(TARGETS, 16, torch.float32),
    AdapterShape(TARGETS, 64, torch.float16),
    AdapterShape(TARGETS, 64, torch.float32),
    AdapterShape(("q_proj", "k_proj", "v_proj", "o_proj"), 16, torch.float32, rslora=True),
    AdapterShape(QV, 8, torch.float16, modules_to_save=("lm_head",)),
)
TASKS = ("reverse", "sort", "copy")

# Marks the library logs at INFO (mergekit_fw.solve.runner, .solver, .output.writer).
MARKS = (
    ("pool checked", re.compile(r"pool checked: ")),
    ("model loaded", re.compile(r"oracle model loaded")),
    ("iteration", re.compile(r"iteration (\d+): loss")),
    ("solve finished", re.compile(r"solve finished: ")),
)

# Runs a console script in-process so that, on a GPU, its peak allocation can be read at exit.
LAUNCHER = """
import atexit, json, sys
from importlib.metadata import entry_points
report, name, *argv = sys.argv[1:]
def _report():
    import torch
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    open(report, "w").write(json.dumps({"cuda_max_memory_allocated": peak}))
atexit.register(_report)
(script,) = [e for e in entry_points(group="console_scripts") if e.name == name]
sys.argv = [name, *argv]
sys.exit(script.load()())
"""


@dataclass
class Sample:
    t: float
    rss: int
    written: int


@dataclass
class Measured:
    seconds: float
    peak_rss: int
    written: int
    samples: List[Sample] = field(default_factory=list)
    marks: List[Tuple[float, str, str]] = field(default_factory=list)  # (t, stage mark, line)
    cuda_peak: Optional[int] = None
    log_tail: str = ""


def _proc_value(pid: int, file: str, key: str) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_measured(argv: List[str], env: Dict[str, str]) -> Measured:
    """One fresh process: its stage marks, RSS and bytes written over time."""
    report = Path(tempfile.mkstemp(suffix=".json")[1])
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(report), *argv], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1)
    marks: List[Tuple[float, str, str]] = []
    tail: List[str] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            now = time.perf_counter() - start
            tail.append(line)
            del tail[:-60]
            for label, pattern in MARKS:
                if pattern.search(line):
                    marks.append((now, label, line.strip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples: List[Sample] = []
    while process.poll() is None:
        rss = _proc_value(process.pid, "status", "VmRSS:")
        written = _proc_value(process.pid, "io", "write_bytes:")
        if rss is not None:
            samples.append(Sample(time.perf_counter() - start, rss * 1024, written or 0))
        time.sleep(0.05)
    reader.join()
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n{''.join(tail)[-4000:]}")
    cuda_peak = json.loads(report.read_text() or "{}").get("cuda_max_memory_allocated")
    report.unlink(missing_ok=True)
    peak = max((s.rss for s in samples), default=0)
    written = max((s.written for s in samples), default=0)
    return Measured(seconds, peak, written, samples, marks, cuda_peak, "".join(tail))


def stages(measured: Measured, trace: dict) -> List[dict]:
    """Split the run at its marks: start-up and pool check, model load, each iteration
    (with the trace's oracle / LMO / step seconds), write and the rest."""
    cuts: List[Tuple[float, str]] = []
    iteration = 0
    for t, label, _ in measured.marks:
        if label == "pool checked":
            cuts.append((t, "start-up and pool check"))
        elif label == "model loaded":
            cuts.append((t, "model load"))
        elif label == "iteration":
            cuts.append((t, f"iteration {iteration}"))
            iteration += 1
        elif label == "solve finished":
            cuts.append((t, "rest of the solve (final loss, release)"))
    cuts.append((measured.seconds, "write and artefacts"))
    rows, begin = [], 0.0
    for end, name in cuts:
        window = [s for s in measured.samples if begin <= s.t <= end]
        before = [s for s in measured.samples if s.t < begin]
        row = {"stage": name, "seconds": round(end - begin, 2),
               "peak_rss": max((s.rss for s in window), default=0),
               "written": (max((s.written for s in window), default=0)
                           - max((s.written for s in before), default=0))}
        if name.startswith("iteration "):
            record = trace["iterations"][int(name.split()[1])]
            row["trace_seconds"] = record.get("seconds", {})
        rows.append(row)
        begin = end
    return rows


def compare_outputs(first: Path, second: Path) -> dict:
    """Why two outputs differ, if they do: their solves (the coefficient tables), and
    tensor by tensor (streamed, one at a time) which differ and by how much."""
    from safetensors import safe_open

    tables = [json.loads((folder / "fw_table.json").read_text()) for folder in (first, second)]
    same_table = tables[0]["coefficients"] == tables[1]["coefficients"]
    table_diff = max((abs(a - b) for name in tables[0]["coefficients"]
                      for a, b in zip(tables[0]["coefficients"][name], tables[1]["coefficients"].get(name, []))),
                     default=0.0)

    def where(folder: Path) -> Dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
        return {n: folder / "model.safetensors" for n in _keys(folder / "model.safetensors")}

    a, b = where(first), where(second)
    differ, largest = [], 0.0
    for name in sorted(a):
        with safe_open(str(a[name]), "pt") as fa, safe_open(str(b[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or not torch.equal(x, y):
            differ.append(name)
            largest = max(largest, float((x.float() - y.float()).abs().max()))
    return {"same_names": set(a) == set(b), "same_shards": {n: p.name for n, p in a.items()}
            == {n: p.name for n, p in b.items()}, "same_tables": same_table, "table_max_diff": table_diff,
            "tensors_differing": len(differ), "tensors": len(a), "first_differing": differ[:5],
            "max_abs_diff": largest}


def compared(comparison: Optional[dict]) -> str:
    if not comparison:
        return ""
    c = comparison
    return (f" (coefficient tables {'equal' if c['same_tables'] else 'differ by up to %.3g' % c['table_max_diff']}; "
            f"{c['tensors_differing']} of {c['tensors']} tensors differ, by up to {c['max_abs_diff']:.3g}; "
            f"shard layout {'the same' if c['same_shards'] else 'different'})")


def _keys(path: Path) -> List[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def fw_config(base: Path, adapters: List[Path], calibration: Path, iterations: int) -> dict:
    """The user's config: defaults but for a 2-iteration cap, so the run fits this machine."""
    return {
        "merge_method": "frank_wolfe",
        "base_model": str(base),
        "models": [{"model": f"{base}+{a}"} for a in adapters],
        "parameters": {"calibration": str(calibration), "iterations": iterations, "batch_size": 4,
                       "max_length": 64},
        "dtype": "bfloat16",
    }


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "mergekit_fw_7b")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--mergekit-adapters", type=int, default=None,
                        help="pool size for mergekit's task_arithmetic (default: the largest this disk holds; 0: skip)")
    parser.add_argument("--no-stock", action="store_true", help="skip mergekit's task_arithmetic")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default evals/results)")
    args = parser.parse_args()

    root = args.root
    t0 = time.perf_counter()
    base = build_base(root / f"base-{args.layers}l", layers=args.layers, shard_bytes=HUB_SHARD_BYTES)
    adapters = [build_adapter(base, root / f"community-{args.layers}l" / f"lora{i:02d}", index=i, layers=args.layers,
                              shape=COMMUNITY_SHAPES[i % len(COMMUNITY_SHAPES)]) for i in range(args.adapters)]
    calibration = write_calibration(root / "calib3.jsonl", tasks=TASKS, samples=2)
    build_seconds = time.perf_counter() - t0
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    adapter_bytes = sum((a / "adapter_model.safetensors").stat().st_size for a in adapters)
    print(f"pool ready in {build_seconds:.0f} s: base {mib(base_bytes)} MiB, adapters {mib(adapter_bytes)} MiB",
          flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench_7b_", dir=root))
    config = work / "fw.yml"
    config.write_text(yaml.safe_dump(fw_config(base, adapters, calibration, args.iterations), sort_keys=False))
    device_args = ["--cuda"] if args.device == "cuda" else []
    commands = {
        "mergekit-fw run": ["mergekit-fw", "run", "-v", str(config), str(work / "out-run"), "--quiet",
                            "--threads", "2"],
        "mergekit-yaml": ["mergekit-yaml", str(config), str(work / "out-yaml"), "-v", "--quiet", *device_args],
    }
    runs: Dict[str, dict] = {}
    for label, argv in commands.items():
        out = Path(argv[4] if label == "mergekit-fw run" else argv[2])
        env = child_env(MERGEKIT_FW_CACHE=str(work / f"cache-{label.split()[0]}"))
        print(f"running {label} ...", flush=True)
        measured = run_measured(argv, env)
        trace = json.loads((out / "fw_trace.json").read_text())
        runs[label] = {"seconds": round(measured.seconds, 1), "peak_rss": measured.peak_rss,
                       "written": measured.written, "output_bytes": folder_bytes(out),
                       "cuda_max_memory_allocated": measured.cuda_peak, "stages": stages(measured, trace),
                       # what the defaults' screen kept (the held members leave the oracle's model)
                       "screen": trace.get("screen"), "passes": trace.get("passes")}
        print(json.dumps({k: v for k, v in runs[label].items() if k != "stages"}), flush=True)
    identical = all(
        subprocess.run(["cmp", "-s", str(f), str(work / "out-yaml" / f.name)]).returncode == 0
        for f in sorted((work / "out-run").glob("*.safetensors")))
    comparison = compare_outputs(work / "out-run", work / "out-yaml")
    print(json.dumps(comparison), flush=True)
    for label in commands:
        shutil.rmtree(work / ("out-run" if label == "mergekit-fw run" else "out-yaml"), ignore_errors=True)

    # mergekit's own task_arithmetic over the same references: each adapter becomes a full copy.
    free = shutil.disk_usage(root).free
    fits = max(0, int((free - 2 * base_bytes) // base_bytes))
    n_stock = min(args.adapters, fits) if args.mergekit_adapters is None else args.mergekit_adapters
    if args.no_stock:
        n_stock = 0
    stock = None
    if n_stock > 0:
        ta = work / "ta.yml"
        ta.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "bfloat16",
                                      "models": [{"model": f"{base}+{a}", "parameters": {"weight": 0.3}}
                                                 for a in adapters[:n_stock]]}, sort_keys=False))
        print(f"running mergekit task_arithmetic over {n_stock} adapters ...", flush=True)
        argv = ["mergekit-yaml", str(ta), str(work / "out-ta"), "--lora-merge-cache", str(work / "lora-cache"),
                "--quiet", *device_args]
        measured = run_measured(argv, child_env())
        stock = {"adapters": n_stock, "seconds": round(measured.seconds, 1), "peak_rss": measured.peak_rss,
                 "written": measured.written, "lora_cache_bytes": folder_bytes(work / "lora-cache"),
                 "cuda_max_memory_allocated": measured.cuda_peak}
        print(json.dumps(stock), flush=True)
    shutil.rmtree(work, ignore_errors=True)

    target_rss = base_bytes * 1.15 + adapter_bytes + 2**30
    data = {"machine": machine(), "device": args.device, "layers": args.layers, "adapters": args.adapters,
            "iterations": args.iterations, "base_bytes": base_bytes, "adapter_bytes": adapter_bytes,
            "build_seconds": round(build_seconds), "runs": runs, "identical_outputs": identical, "comparison": comparison,
            "task_arithmetic": stock, "disk_free_before_stock": free,
            "stock_disk_for_all_adapters": args.adapters * base_bytes + base_bytes,
            "target_peak_rss": target_rss}
    write_report(data, args.out)


def screened(runs: dict[str, dict]) -> list[str]:
    """A line per command on what its screen kept and the passes its solve spent (runs
    recorded before the bench read them have neither)."""
    lines = []
    for label, r in runs.items():
        screen, passes = r.get("screen"), r.get("passes")
        if screen:
            kept = len(screen["kept"])
            lines.append(f"- `{label}`'s screen kept {kept} of {kept + len(screen['dropped'])} adapters"
                         + (f"; passes {passes.get('forward', 0):g} forward, {passes.get('gradient', 0):g} gradient"
                            if passes else "") + ".")
    return lines


def write_report(data: dict, out: Optional[Path]) -> None:
    runs, stock = data["runs"], data["task_arithmetic"]
    run, via_yaml = runs["mergekit-fw run"], runs["mergekit-yaml"]
    name = "bench_7b" if data["device"] == "cpu" else "bench_7b_cuda"
    lines = [
        f"# Llama-2-7B-shaped merge, {data['layers']} layers"
        f"{' (full depth)' if data['layers'] == 32 else ''}, {data['adapters']} community-shaped adapters ({data['device']})",
        "",
        f"`python -m evals.bench_7b --layers {data['layers']} --adapters {data['adapters']} --device {data['device']}`. "
        f"Base: {data['layers']} layers, hidden 4096, intermediate 11008, 32 heads, vocab 32000, bf16, "
        f"{mib(data['base_bytes'])} MiB in hub-sized shards, random weights. Adapters ({mib(data['adapter_bytes'])} MiB): "
        "q/v at r 8 and 16, all linear modules at r 16 and 64, one rsLoRA, one with `modules_to_save: [lm_head]`, "
        f"fp16 and fp32 files. Calibration: 3 tasks x 2 rows. Frank-Wolfe at its defaults but at most "
        f"{data['iterations']} iterations; `oracle_dtype: auto` follows `dtype: bfloat16`. "
        "One fresh process per command.",
        "",
        f"Machine: {data['machine']}",
        "",
        "| command | seconds | peak RSS MiB | written MiB | output MiB | CUDA peak MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in runs.items():
        cuda = mib(r["cuda_max_memory_allocated"]) if r["cuda_max_memory_allocated"] else "-"
        lines.append(f"| `{label}` | {r['seconds']:.0f} | {mib(r['peak_rss'])} | {mib(r['written'])} | "
                     f"{mib(r['output_bytes'])} | {cuda} |")
    if stock:
        cuda = mib(stock["cuda_max_memory_allocated"]) if stock["cuda_max_memory_allocated"] else "-"
        lines.append(f"| mergekit `task_arithmetic`, {stock['adapters']} `BASE+LORA` | {stock['seconds']:.0f} | "
                     f"{mib(stock['peak_rss'])} | {mib(stock['written'])} (LoRA cache {mib(stock['lora_cache_bytes'])}) | "
                     f"| {cuda} |")
    target = data["target_peak_rss"]
    ratio_t, ratio_m = via_yaml["seconds"] / run["seconds"], via_yaml["peak_rss"] / run["peak_rss"]
    lines += [
        "",
        f"- Outputs of the two commands byte-identical: {'yes' if data['identical_outputs'] else '**no**'}"
        + compared(data.get("comparison")) + ".",
        f"- Peak RSS target (base x 1.15 + adapters + 1 GiB = {mib(target)} MiB): `mergekit-fw run` "
        f"{'met' if run['peak_rss'] <= target else '**missed**'}, `mergekit-yaml` "
        f"{'met' if via_yaml['peak_rss'] <= target else '**missed**'}.",
        f"- `mergekit-yaml` against `mergekit-fw run`: {ratio_t:.2f}x the time, {ratio_m:.2f}x the peak RSS "
        f"(target 1.2x: {'met' if max(ratio_t, ratio_m) <= 1.2 else '**missed**'}).",
        *screened(runs),
        f"- mergekit's `task_arithmetic` over all {data['adapters']} adapters would need about "
        f"{data['stock_disk_for_all_adapters'] / 1e9:.0f} GB of disk (a full copy per adapter and the output); "
        f"{data['disk_free_before_stock'] / 1e9:.0f} GB were free.",
        "",
    ]
    for label, r in runs.items():
        lines += [f"## `{label}` by stage", "", "| stage | seconds | oracle / LMO / step s | peak RSS MiB | written MiB |",
                  "| --- | ---: | --- | ---: | ---: |"]
        for row in r["stages"]:
            parts = row.get("trace_seconds") or {}
            split = " / ".join(f"{parts[k]:.1f}" for k in ("oracle", "lmo", "step") if k in parts)
            lines.append(f"| {row['stage']} | {row['seconds']:.1f} | {split} | {mib(row['peak_rss'])} | "
                         f"{mib(row['written'])} |")
        lines.append("")
    markdown = "\n".join(lines)
    if out is None:
        write_results(name, data, markdown)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(data, indent=1))
        (out / f"{name}.md").write_text(markdown)
        print(markdown)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
