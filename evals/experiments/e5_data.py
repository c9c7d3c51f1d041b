"""Experiment 5 (paper Figure 5): calibration rows per task, for every method that uses data."""

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
from evals.methods import DATA_INFORMED, method

STEM = "exp5_data"


def run(ctx: Context) -> Path:
    members = ctx.main_members()
    jobs = [(ctx.cell(members, per_task=n), method(name)) for n in ctx.plan.per_task for name in DATA_INFORMED]
    records = run_cells(ctx, jobs, "exp5")
    series: Dict[str, Dict[int, float]] = {}
    for record in records:
        series.setdefault(record["title"], {})[record["cell"]["per_task"]] = record["normalized"]
    text = (f"# Experiment 5: data efficiency on the {len(members)}-member main pool\n\n"
            "Rows per task are the first N of each asked task's calibration split, the same rows for every method "
            "(task arithmetic uses them to pick lambda, AdaMerging their prompts only, MTL trains on them).\n\n"
            + series_table(series, "N =", ctx.plan.per_task))
    return write_experiment(ctx, STEM, {"series": series, "records": records}, text,
                            lambda p: line_figure(p, series, "calibration rows per task", "Experiment 5: data efficiency"))


if __name__ == "__main__":
    main(run)
