"""Probe (issue 17, goal 3): exact match of the two-stage lead's second stage on experiment 2's
20-member cells of the full testbed.

The members listed below are the ones that a solve per candidate kept at a mean coefficient of
0.1 or more (``python -m evals.probe_exp2_heldout W SEED 20 two_stage 0.1`` printed them). This
script scores the defaults per rank component (the ``fw_rank`` row) on those members alone,
through the evals pipeline (mergekit-fw, lm-eval). The records land in the workspace like any
cell's. Run from the repository root: ``python -m evals.probe_two_stage_em W 0,1,2 [task_top2]``
(``task_top2``: the members kept by the per-task screen instead, listed in TOP2). On the quick
testbed the screen is computed from the records: ``python -m evals.probe_two_stage_em quick
/work/Wf 14 full 0,1`` (experiment 1's main pool) and ``... quick /work/Wq 10 tasks_only 0,1,2``
(experiment 2's 10-member cell).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


def task_top2(record: dict) -> list[str]:
    """The cell's members that rank among the 2 most negative scores at the start for some
    asked task (the trace's ``task_scores``: per task, per member), in the cell's order."""
    members, asked = record["cell"]["members"], record["cell"]["asked"]
    scores = record["info"]["trace"]["task_scores"]
    kept: set[str] = set()
    for task in range(len(asked)):
        kept |= {members[i] for i in sorted(range(len(members)), key=lambda i: scores[task][i])[:2]}
    return [m for m in members if m in kept]


def quick(work: str, members: int, tasks_only: bool, seeds: list[int]) -> None:
    """The per-task screen on a quick-testbed cell of ``members`` members and 4 asked tasks at
    100 rows a task, read from that cell's ``fw_box_arc_adaptive_30`` record."""
    for seed in seeds:
        records = [json.loads(path.read_text())
                   for path in Path(f"{work}/quick_{seed}/records").glob("*/fw_box_arc_adaptive_30.json")]
        record = next(r for r in records if len(r["cell"]["members"]) == members
                      and len(r["cell"]["asked"]) == 4 and r["cell"]["per_task"] == 100)
        kept = task_top2(record)
        ctx = open_context("quick", seed, f"{work}/quick_{seed}", tasks_only=tasks_only)
        cell = ctx.cell(kept, asked=record["cell"]["asked"], per_task=100)
        for result in run_cells(ctx, [(cell, method("fw_rank"))], "two-stage"):
            spend = result["spend"]
            print(f"seed {seed}: kept {', '.join(kept)}; normalised {result['normalized']:.1f}, "
                  f"{spend['forward'] + 3 * spend['gradient']:.0f} u", flush=True)


def main() -> None:
    if sys.argv[1] == "quick":  # quick W MEMBERS tasks_only|full SEEDS
        quick(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "tasks_only", [int(s) for s in sys.argv[5].split(",")])
        return
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
