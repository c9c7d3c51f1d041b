"""Experiment 6 (paper Table 5, Figure 4): hard vs soft, layer vs task LMO, starting points,
merge functions, LMO score and step rule, each changed alone on the main pool."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from evals.experiments.cli import main
from evals.experiments.common import Context, records_of, run_cells, write_experiment
from evals.experiments.seeds import Stats, bar_figure, bar_table, collect, mean_std
from evals.methods import ABLATIONS, BEYOND, method

STEM = "exp6_ablations"
VARIANTS = ("fw_hard_layer", "fw_hard_task", "fw_soft_layer", "fw_soft_task")


def run(ctx: Context) -> Path:
    cell = ctx.cell(ctx.main_members())
    records = run_cells(ctx, [(cell, method(n)) for n in (*VARIANTS, *ABLATIONS, *BEYOND)], "exp6")
    return write_experiment(ctx, STEM, {"members": list(cell.members), "asked": list(cell.asked), "records": records},
                            summarize)


def summarize(per_seed: Dict[int, dict], figure: Path) -> Tuple[str, List[Stats]]:
    stats = collect(records_of(per_seed))
    some = per_seed[min(per_seed)]
    asked = some.get("asked") or list(stats[0].scores)
    lines = ["| setting | calibration loss (mean ± std) | iterations |", "| --- | ---: | ---: |"]
    for st in stats:
        traces = [r["info"].get("trace", {}) for r in st.records]
        final = mean_std([t["final_loss"] for t in traces if t.get("final_loss") is not None])
        iterations = mean_std([len(t.get("iterations", [])) for t in traces])[0]
        lines.append(f"| {st.title} | {final[0]:.4f} ± {final[1]:.4f} | {iterations:.0f} |")
    text = (f"# Experiment 6: ablations on the {len(some['members'])}-member main pool\n\n"
            + bar_table(stats, asked) + "\n" + "\n".join(lines) + "\n")
    bar_figure(figure, stats, "Experiment 6: Frank-Wolfe ablations")
    return text, stats


if __name__ == "__main__":
    main(run)
