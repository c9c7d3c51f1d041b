"""Experiment 2 (paper Table 3, left): the asked tasks stay, irrelevant adapters are added."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from evals.experiments.cli import main
from evals.experiments.common import Context, line_figure, run_cells, series_table, write_experiment
from evals.methods import SCALING, method

STEM = "exp2_irrelevant"


def run(ctx: Context) -> Path:
    own = [ctx.lora(t) for t in ctx.plan.asked]
    irrelevant = ctx.irrelevant()
    sizes = [len(own) + m for m in ctx.plan.irrelevant_added]
    jobs = [(ctx.cell(own + irrelevant[:m]), method(name)) for m in ctx.plan.irrelevant_added for name in SCALING]
    records = run_cells(ctx, jobs, "exp2")
    series: Dict[str, Dict[int, float]] = {}
    for record in records:
        series.setdefault(record["title"], {})[len(record["cell"]["members"])] = record["normalized"]
    fw = {name: row for name, row in series.items() if name.startswith("FW")}
    ta = series[method("task_arithmetic").title]
    lo, hi = sizes[0], sizes[-1]
    fw_lines = "\n".join(
        f"- {name}: {row[lo]:.1f} -> {row[hi]:.1f} ({row[hi] - row[lo]:+.1f}): drops by at most 1 point "
        f"**{'met' if row[lo] - row[hi] <= 1.0 else 'missed'}**"
        for name, row in fw.items())
    text = (
        f"# Experiment 2: irrelevant adapters added ({lo} -> {hi} members), asked: {', '.join(ctx.plan.asked)}\n\n"
        f"Members: the asked tasks' own LoRAs, then irrelevant task LoRAs in order: {', '.join(irrelevant[:max(ctx.plan.irrelevant_added)])}.\n\n"
        + series_table(series, "n =", sizes)
        + f"\n## Targets\n\n{fw_lines}\n- task_arithmetic falls by 10+: {ta[lo]:.1f} -> {ta[hi]:.1f} ({ta[hi] - ta[lo]:+.1f}) "
        f"**{'met' if ta[lo] - ta[hi] >= 10 else 'missed'}**\n"
    )
    return write_experiment(ctx, STEM, {"sizes": sizes, "series": series, "records": records}, text,
                            lambda p: line_figure(p, series, "pool size (asked tasks' own + irrelevant)", "Experiment 2: irrelevant adapters"))


if __name__ == "__main__":
    main(run)
