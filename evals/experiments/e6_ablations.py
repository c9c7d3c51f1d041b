"""Experiment 6 (paper Table 5, Figure 4): hard vs soft, layer vs task LMO, starting points,
merge functions, LMO score and step rule, each changed alone on the main pool."""

from __future__ import annotations

from pathlib import Path

from evals.experiments.cli import main
from evals.experiments.common import (
    Context,
    bar_figure,
    run_cells,
    score_table,
    write_experiment,
)
from evals.methods import ABLATIONS, method

STEM = "exp6_ablations"
VARIANTS = ("fw_hard_layer", "fw_hard_task", "fw_soft_layer", "fw_soft_task")


def run(ctx: Context) -> Path:
    cell = ctx.cell(ctx.main_members())
    records = run_cells(ctx, [(cell, method(n)) for n in (*VARIANTS, *ABLATIONS)], "exp6")
    for record in records:
        trace = record["info"].get("trace", {})
        record["final_loss"] = trace.get("final_loss")
        record["iterations"] = len(trace.get("iterations", []))
    lines = ["| setting | calibration loss | iterations |", "| --- | ---: | ---: |"]
    lines += [f"| {r['title']} | {r['final_loss']:.4f} | {r['iterations']} |" for r in records]
    text = (f"# Experiment 6: ablations on the {len(cell.members)}-member main pool\n\n"
            + score_table(records, cell.asked) + "\n" + "\n".join(lines) + "\n")
    return write_experiment(ctx, STEM, {"records": records}, text,
                            lambda p: bar_figure(p, records, "Experiment 6: Frank-Wolfe ablations"))


if __name__ == "__main__":
    main(run)
