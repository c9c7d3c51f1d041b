"""Experiment 3 (paper Table 3, right): asked tasks and the pool grow together."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from evals.experiments.cli import main
from evals.experiments.common import (
    Context,
    line_figure,
    run_cells,
    series_table,
    write_experiment,
)
from evals.methods import SCALING, method

STEM = "exp3_relevant"
# Added after every method, FW included, fell as k grew on the full testbed. Frank-Wolfe's hull
# caps the members' total coefficient at 1 per tensor, about 1/k per asked task, while the
# task_arithmetic row's picked lambda * k reached 2.0 at k = 20. Starting from that same
# calibrated task-arithmetic merge adds it as a vertex (Algorithm 1, line 1), lifting the cap.
PROBES = ("fw_hard_layer_init_ta_calibrated",)


def run(ctx: Context) -> Path:
    order = list(ctx.plan.asked) + [t for t in ctx.pool.size.tasks if t not in ctx.plan.asked]
    jobs = []
    for k in ctx.plan.relevant_asked:
        asked = order[:k]
        cell = ctx.cell([ctx.lora(t) for t in asked], asked)
        jobs += [(cell, method(name)) for name in (*SCALING, *PROBES)]
    records = run_cells(ctx, jobs, "exp3")
    series: Dict[str, Dict[int, float]] = {}
    for record in records:
        series.setdefault(record["title"], {})[len(record["cell"]["asked"])] = record["normalized"]
    text = (
        f"# Experiment 3: relevant adapters added (asked tasks = pool, {ctx.plan.relevant_asked[0]} -> {ctx.plan.relevant_asked[-1]})\n\n"
        f"Task order: {', '.join(order[:max(ctx.plan.relevant_asked)])}; each asked task's own LoRA is in the pool.\n\n"
        + series_table(series, "k =", ctx.plan.relevant_asked)
    )
    return write_experiment(ctx, STEM, {"series": series, "records": records}, text,
                            lambda p: line_figure(p, series, "asked tasks = adapters in the pool", "Experiment 3: relevant adapters"))


if __name__ == "__main__":
    main(run)
