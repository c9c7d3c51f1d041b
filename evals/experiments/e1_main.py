"""Experiment 1 (paper Tables 1-2): every method on the main pool, four asked tasks."""

from __future__ import annotations

from pathlib import Path

from evals.experiments.cli import main
from evals.experiments.common import (
    Context,
    bar_figure,
    individual_record,
    run_cells,
    score_table,
    write_experiment,
)
from evals.methods import MAIN, method

STEM = "exp1_main"


def records(ctx: Context) -> list:
    cell = ctx.cell(ctx.main_members())
    return run_cells(ctx, [(cell, method(name)) for name in MAIN], "exp1") + [individual_record(ctx, cell.asked)]


def run(ctx: Context) -> Path:
    rows = records(ctx)
    members = ctx.main_members()
    best_free = max((r for r in rows if r["family"] == "data-free"), key=lambda r: r["normalized"])
    ada = next(r for r in rows if r["method"] == "adamerging")
    fw = [r for r in rows if r["family"] == "frank-wolfe"]
    best_fw = max(fw, key=lambda r: r["normalized"])
    text = (
        f"# Experiment 1: all methods, {len(members)}-member pool, asked: {', '.join(ctx.plan.asked)}\n\n"
        f"Pool: {', '.join(members)}.\n\n" + score_table(rows, ctx.plan.asked) +
        "\n## Targets\n\n"
        f"- FW beats the best data-free mergekit method by 5+ normalised points: best FW ({best_fw['title']}) "
        f"{best_fw['normalized']:.1f} vs {best_free['title']} {best_free['normalized']:.1f}: "
        f"{best_fw['normalized'] - best_free['normalized']:+.1f} -> **{'met' if best_fw['normalized'] - best_free['normalized'] >= 5 else 'missed'}**.\n"
        f"- FW matches or beats AdaMerging at equal calibration data: {best_fw['normalized']:.1f} vs "
        f"{ada['normalized']:.1f} -> **{'met' if best_fw['normalized'] >= ada['normalized'] else 'missed'}**.\n"
    )
    return write_experiment(ctx, STEM, {"members": list(members), "records": rows}, text,
                            lambda path: bar_figure(path, rows, f"Experiment 1: {len(members)}-member pool"))


if __name__ == "__main__":
    main(run)
