"""Experiment 5 (paper Figure 5): calibration rows per task, for every method that uses data."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from evals.experiments.cli import main
from evals.experiments.common import Context, records_of, run_cells, write_experiment
from evals.experiments.seeds import Stats, collect, line_figure, series_table
from evals.methods import DATA_INFORMED, method

STEM = "exp5_data"
# issue 17's candidates for new defaults: which of them holds up with fewer calibration rows
CANDIDATE_DEFAULTS = ("fw_box_pairwise_30", "fw_box_arc_30", "fw_box_arc_adaptive_30", "pg_box",
                      # one coefficient per LoRA rank component (granularity: rank_component)
                      "fw_rank", "pg_rank", "supervised_rank", "sfw_rank",
                      # granularity auto (the defaults since): per rank component from 50 rows a task
                      "fw_auto", "fw_auto_screen2", "fw_auto_screen1", "fw_auto_screen3",
                      # the slope's screen with its floor, and by slope or loss (the defaults of 2026-12-07);
                      # one place a task by each (the defaults since the twelfth session)
                      "fw_auto_screen2_floor0.1", "fw_auto_screen2_both", "fw_auto_screen1_both",
                      # hard FW with a cost per unit of weight (issue 17)
                      "fw_rank_wp0.3", "fw_box_arc_adaptive_30_wp0.3",
                      # with a cost per unit of weight, added after the full testbed's k = 20 (issue 17)
                      "sfw_rank_wp0.3",
                      # the defaults' screen, then projected gradient (issue 17, k = 20); solver auto, the
                      # defaults since the fourteenth session
                      "pg_auto_screen1_both", "auto_screen1_both")


def run(ctx: Context) -> Path:
    members = ctx.main_members()
    jobs = [(ctx.cell(members, per_task=n), method(name)) for n in ctx.plan.per_task for name in (*DATA_INFORMED, *CANDIDATE_DEFAULTS)]
    records = run_cells(ctx, jobs, "exp5")
    return write_experiment(ctx, STEM, {"members": list(members), "records": records}, summarize)


def summarize(per_seed: Dict[int, dict], figure: Path) -> Tuple[str, List[Stats]]:
    stats = collect(records_of(per_seed), lambda r: r["cell"]["per_task"])
    rows = sorted({s.x for s in stats})
    members = per_seed[min(per_seed)]["members"]
    text = (f"# Experiment 5: data efficiency on the {len(members)}-member main pool\n\n"
            "Rows per task are the first N of each asked task's calibration split, the same rows for every method "
            "(task arithmetic uses them to pick lambda, AdaMerging and FW with entropy their prompts only, the "
            "supervised baseline, LoraHub and FW their answers too, MTL trains on them).\n\n"
            + series_table(stats, "N =", rows))
    line_figure(figure, stats, "calibration rows per task", "Experiment 5: data efficiency")
    return text, stats


if __name__ == "__main__":
    main(run)
