"""Experiment 1 (paper Tables 1-2): every method on the main pool, four asked tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from evals.experiments.cli import main
from evals.experiments.common import Context, individual_record, records_of, run_cells, write_experiment
from evals.experiments.seeds import Stats, bar_figure, bar_table, collect, holds, shown
from evals.methods import MAIN, defaults_row, method

STEM = "exp1_main"
PAPER_FW = "fw_hard_layer"  # the paper's Frank-Wolfe (mergekit-fw's defaults before issue 17)
DEFAULT_FW = defaults_row() or PAPER_FW  # merge_method: frank_wolfe with nothing set, today
RIVALS = ("supervised", "lorahub", "lorahub_cma")  # the goal: FW at its defaults at or above these
# issue 17's candidates for new defaults (the rest of evals.methods.BEYOND is in experiment 6,
# on the same cell)
CANDIDATE_DEFAULTS = ("fw_box", "fw_scaled_hull_2", "fw_box_30", "fw_box_pairwise_30", "fw_box_arc_30", "fw_box_arc_adaptive_30",
                      "pg_box", "pg_hull", "sfw_box",
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
                      # the defaults' screen, then projected gradient on the members kept (issue 17, k = 20)
                      "pg_auto_screen1_both",
                      # solver auto: the row above per rank component, fw_auto_screen1_both per candidate
                      # (the defaults since the fourteenth session)
                      "auto_screen1_both")


def records(ctx: Context) -> list:
    cell = ctx.cell(ctx.main_members())
    return run_cells(ctx, [(cell, method(name)) for name in (*MAIN, *CANDIDATE_DEFAULTS)], "exp1") + [individual_record(ctx, cell.asked)]


def run(ctx: Context) -> Path:
    rows = records(ctx)
    return write_experiment(ctx, STEM, {"members": list(ctx.main_members()), "asked": list(ctx.plan.asked),
                                        "records": rows}, summarize)


def versus(stats: List[Stats], ours: str, theirs: str) -> str:
    """``ours`` against ``theirs``: means with spread, the difference, and on which seeds ours is at or above."""
    a = next((s for s in stats if s.method == ours), None)
    b = next((s for s in stats if s.method == theirs), None)
    if a is None or b is None:
        return f"{ours} vs {theirs}: not run on these seeds"
    common = sorted(set(a.seeds) & set(b.seeds))
    each = {s: a.by_seed()[s] >= b.by_seed()[s] for s in common}
    verdict = "met" if a.mean >= b.mean else "missed"
    return (f"{a.title} {shown(a.normalized)} vs {b.title} {shown(b.normalized)}: {a.mean - b.mean:+.1f} -> "
            f"**{verdict}** (on the mean); at or above on each seed: {holds(each)}")


def above_data_free(stats: List[Stats]) -> str:
    """The goal line "FW at its defaults beats the best data-free mergekit method by 5+
    points"; a run limited to some methods (``--methods``) may lack either side."""
    free = [s for s in stats if s.family == "data-free"]
    fw = next((s for s in stats if s.method == DEFAULT_FW), None)
    if not free or fw is None:
        return "FW at its defaults against the best data-free mergekit method: not run on these seeds."
    best = max(free, key=lambda s: s.mean)
    return (f"FW at its defaults beats the best data-free mergekit method ({best.title}) by 5+ points: "
            f"{fw.mean - best.mean:+.1f} -> **{'met' if fw.mean - best.mean >= 5 else 'missed'}**.")


def summarize(per_seed: Dict[int, dict], figure: Path) -> Tuple[str, List[Stats]]:
    stats = collect(records_of(per_seed))
    some = per_seed[min(per_seed)]
    asked, members = some["asked"], some["members"]
    lines = [f"- {versus(stats, DEFAULT_FW, rival)}." for rival in RIVALS if any(s.method == rival for s in stats)]
    text = (
        f"# Experiment 1: all methods, {len(members)}-member pool, asked: {', '.join(asked)}\n\n"
        f"Pool: {', '.join(members)}.\n\n" + bar_table(stats, asked)
        + "\n## Goals\n\n"
        "- FW at its defaults at or above the supervised layer-wise baseline and LoraHub, same rows:\n  "
        + "\n  ".join(lines) + "\n"
        f"- {above_data_free(stats)}\n"
        f"- {versus(stats, 'fw_entropy', 'adamerging')} (both without labels, the same entropy objective).\n"
        "- At equal passes (forward-pass equivalents, a gradient pass counting 3), against the supervised "
        "baseline on the same labels:\n"
        f"  - AdaMerging's budget (500 steps of 16 rows a task): {versus(stats, 'fw_hard_layer_ada_budget', 'supervised')}.\n"
        f"  - the paper's FW budget (10 iterations, 8-pass line searches): {versus(stats, PAPER_FW, 'supervised_fw_budget')}.\n"
    )
    bar_figure(figure, stats, f"Experiment 1: {len(members)}-member pool")
    return text, stats


if __name__ == "__main__":
    main(run)
