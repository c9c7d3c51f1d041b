"""Probe (issue 17, goal 3): exact match of the two-stage lead's second stage on experiment 2's
20-member cells of the full testbed.

The members listed below are the ones that a solve per candidate kept at a mean coefficient of
0.1 or more (``python -m evals.probe_exp2_heldout W SEED 20 two_stage 0.1`` printed them). This
script scores the defaults per rank component (the ``fw_rank`` row) on those members alone,
through the evals pipeline (mergekit-fw, lm-eval). The records land in the workspace like any
cell's. Run from the repository root: ``python -m evals.probe_two_stage_em W 0,1,2 [task_top2]``
(``task_top2``: the members kept by the per-task screen instead, listed in TOP2).
"""

from __future__ import annotations

import sys

from evals.experiments.common import open_context, run_cells
from evals.methods import method

KEPT = {  # screen "candidate": a solve per candidate kept members at a mean coefficient >= 0.1
    0: "reverse sort cipher firstbigger swapends argmin firstlast",
    1: "reverse sort cipher firstbigger firstlast",
    2: "reverse sort cipher firstbigger swapends interleave mirror shiftup double argmin firstlast",
}
# screen "task_top2": for each asked task, the 2 members whose score at the base on that task's
# rows is most negative (the per-task scores the first FW gradient already holds: the trace's
# task_scores of the fw_box_arc_adaptive_30 record on the 20-member cell)
TOP2 = {
    0: "reverse sort cipher firstbigger swapends interleave shiftup",
    1: "reverse sort cipher firstbigger swappairs shiftup diffs",
    2: "reverse sort cipher firstbigger rotateright double",
}


def main() -> None:
    work = sys.argv[1]
    kept = TOP2 if len(sys.argv) > 3 and sys.argv[3] == "task_top2" else KEPT
    for seed in (int(s) for s in sys.argv[2].split(",")):
        ctx = open_context("full", seed, f"{work}/full_{seed}", tasks_only=True)
        cell = ctx.cell([ctx.lora(task) for task in kept[seed].split()])
        for record in run_cells(ctx, [(cell, method("fw_rank"))], "two-stage"):
            spend = record["spend"]
            print(f"seed {seed}: {len(cell.members)} members, normalised {record['normalized']:.1f}, "
                  f"{record['scores']}, {spend['forward'] + 3 * spend['gradient']:.0f} u, {spend['seconds']:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()
