"""Experiment 9 (the paper's relevant-models protocol, Table 3 right as published): the
tasks of the largest pool are all asked and scored at every pool size, while their own
adapters are added to the pool in order (paper: FW 59.2 -> 68.3 from 4 to 20 adapters, while
data-free methods fall). Experiment 3 keeps the other reading, where the asked tasks grow
with the pool."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from evals.experiments.cli import main
from evals.experiments.common import Context, records_of, run_cells, write_experiment
from evals.experiments.e3_relevant import PROBES, task_order
from evals.experiments.seeds import Stats, collect, holds, line_figure, series, series_table
from evals.methods import BEYOND, SCALING, defaults_row, method

STEM = "exp9_relevant_all"
WATCHED = ("fw_hard_layer", "supervised", "task_arithmetic")
# Every cell calibrates on every task's rows, so on the full testbed one cell costs what
# experiment 3's largest does (measured on 2 cores: the data-free tier 10 min for the five
# cells, FW at its defaults 29 min, the rest hours). The methods run in tiers, the
# protocol's own comparison (data-free methods against FW at its defaults) first, and the
# results are written after each tier: a run stopped early still reports every pool size
# for the methods it reached.
EXPENSIVE = ("supervised", "lorahub", "fw_hard_layer_init_ta_calibrated", "adamerging", "fw_soft_task")
CHEAP = tuple(name for name in SCALING if name not in EXPENSIVE and name != "fw_hard_layer")
TIERS: Tuple[Tuple[str, ...], ...] = (CHEAP, ("fw_hard_layer",), *((name,) for name in EXPENSIVE), tuple(BEYOND))


def run(ctx: Context) -> Path:
    order = task_order(ctx)
    # the paper's 20 tasks: those whose adapters have all joined at the largest pool (the
    # testbed has more tasks than that; the others would never get their adapter)
    everything = order[: max(ctx.plan.relevant_asked)]
    cells = [ctx.cell([ctx.lora(t) for t in order[:k]], everything) for k in ctx.plan.relevant_asked]
    records: List[dict] = []
    written = None
    for tier in TIERS:
        records += run_cells(ctx, [(cell, method(name)) for name in tier for cell in cells], "exp9")
        written = write_experiment(ctx, STEM, {"order": order, "asked": everything, "records": records}, summarize)
    assert written is not None
    return written


def summarize(per_seed: Dict[int, dict], figure: Path) -> Tuple[str, List[Stats]]:
    stats = collect(records_of(per_seed), lambda r: len(r["cell"]["members"]))
    ks = sorted({s.x for s in stats})
    some = per_seed[min(per_seed)]
    rows = series(stats)
    lines = []
    current = defaults_row()  # merge_method: frank_wolfe with nothing set, today
    for name in (*([current] if current and current not in WATCHED else []), *WATCHED):
        row = rows.get(method(name).title, {})
        if ks[0] in row and ks[-1] in row:
            first, last = row[ks[0]].by_seed(), row[ks[-1]].by_seed()
            rises = {s: last[s] > first[s] for s in first if s in last}
            per_seed = ", ".join(f"seed {s}: {first[s]:.1f} -> {last[s]:.1f}" for s in sorted(rises))
            label = f"at mergekit-fw's defaults, {method(name).title}" if name == current else method(name).title
            lines.append(f"- {label}: {row[ks[0]].mean:.1f} -> {row[ks[-1]].mean:.1f} ({per_seed}); rises with the "
                         f"pool: {holds(rises)}")
    text = (f"# Experiment 9: all {len(some['asked'])} tasks asked, their adapters added {ks[0]} -> {ks[-1]}\n\n"
            f"Adapters added in this order: {', '.join(some['order'][:ks[-1]])}. Calibration: every task's rows.\n\n"
            + series_table(stats, "adapters", ks) + "\n## Does FW rise as relevant adapters arrive?\n\n"
            + "\n".join(lines) + "\n")
    line_figure(figure, stats, "adapters in the pool (every task asked)", "Experiment 9: relevant adapters, all tasks asked")
    return text, stats


if __name__ == "__main__":
    main(run)
