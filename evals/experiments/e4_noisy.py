"""Experiment 4 (paper Figure 1c): the main pool plus adapters trained from another initialisation."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from evals.experiments.cli import main
from evals.experiments.common import Context, run_cells, write_experiment
from evals.experiments.seeds import Stats, collect, line_figure, series, shown
from evals.methods import SCALING, method

STEM = "exp4_noisy"
# issue 17's candidates for new defaults: does a set that lets any member in at full strength
# (the box) still keep the misinitialised adapters out?
CANDIDATE_DEFAULTS = ("fw_box_pairwise_30", "fw_box_arc_30", "fw_box_arc_adaptive_30", "pg_box", "sfw_box",
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
    clean = ctx.cell(ctx.main_members())
    noisy = ctx.cell(ctx.main_members() + ctx.noisy())
    names = (*SCALING, *CANDIDATE_DEFAULTS)
    before = run_cells(ctx, [(clean, method(n)) for n in names], "exp4 clean")
    after = run_cells(ctx, [(noisy, method(n)) for n in names], "exp4 noisy")
    return write_experiment(ctx, STEM, {"noisy_members": list(ctx.noisy()), "clean": before, "noisy": after}, summarize)


def summarize(per_seed: Dict[int, dict], figure: Path) -> Tuple[str, List[Stats]]:
    both = {seed: [*data["clean"], *data["noisy"]] for seed, data in per_seed.items()}
    stats = collect(both, lambda r: len(r["cell"]["members"]))
    sizes = sorted({s.x for s in stats})
    lines = ["| method | main pool | + noisy | change (mean) | change per seed |", "| --- | ---: | ---: | ---: | --- |"]
    for title, row in series(stats).items():
        if sizes[0] not in row or sizes[-1] not in row:
            continue
        a, b = row[sizes[0]], row[sizes[-1]]
        each = ", ".join(f"{b.by_seed()[s] - a.by_seed()[s]:+.1f}" for s in a.seeds if s in b.by_seed())
        lines.append(f"| {title} | {shown(a.normalized)} | {shown(b.normalized)} | {b.mean - a.mean:+.1f} | {each} |")
    some = per_seed[min(per_seed)]
    noisy = some.get("noisy_members") or []
    text = (f"# Experiment 4: noisy (misinitialised) adapters added: {', '.join(noisy)}\n\n"
            f"Each noisy LoRA was trained on a base from another initialisation and is applied to ours, as a "
            f"mislabelled download would be.\n\n" + "\n".join(lines) + "\n")
    line_figure(figure, stats, "pool size (main pool, then + noisy adapters)", "Experiment 4: + noisy adapters")
    return text, stats


if __name__ == "__main__":
    main(run)
