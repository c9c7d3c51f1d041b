"""Experiment 8: which positions the entropy objective (prompts, no answers) should count,
chosen by measurement. FW and AdaMerging share each choice, on the same rows: every
prompt position (AdaMerging's surrogate taken literally), the answer's first position
(the last prompt position), or the first 2 or 4 answer positions along the starting
point's greedy continuation. Two cells: the main pool with four asked tasks, and six
adapters of which two are asked (where the prompt-position entropy fell below the base)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from evals.experiments.cli import main
from evals.experiments.common import Context, run_cells, write_experiment
from evals.experiments.seeds import Stats, bar_figure, bar_table, collect, holds, shown
from evals.methods import method

STEM = "exp8_entropy"
CHOICES = {  # positions -> (FW row, AdaMerging row)
    "prompt": ("fw_entropy_prompt", "adamerging_prompt"),
    "answer (1 position)": ("fw_entropy", "adamerging"),
    "answer (2 positions)": ("fw_entropy_answer2", "adamerging_answer2"),
    "answer (4 positions)": ("fw_entropy_answer4", "adamerging_answer4"),
}
REFERENCES = ("base", "fw_hard_layer")  # no merge; FW with labels
SAME_START = "fw_entropy_init_ta"  # FW with entropy from AdaMerging's own starting point
SMALL_ASKED = 2
SMALL_MEMBERS = 6


def cells(ctx: Context):
    main_cell = ctx.cell(ctx.main_members())
    asked = ctx.plan.asked[:SMALL_ASKED]
    own = [ctx.lora(t) for t in asked]
    small = ctx.cell(own + ctx.irrelevant()[: SMALL_MEMBERS - len(own)], asked)
    return {"main": main_cell, "small": small}


def run(ctx: Context) -> Path:
    names = [*REFERENCES, *(name for pair in CHOICES.values() for name in pair), SAME_START]
    data = {}
    for label, cell in cells(ctx).items():
        data[label] = {"members": list(cell.members), "asked": list(cell.asked),
                       "records": run_cells(ctx, [(cell, method(n)) for n in names], f"exp8 {label}")}
    return write_experiment(ctx, STEM, data, summarize)


def summarize(per_seed: Dict[int, dict], figure: Path) -> Tuple[str, List[Stats]]:
    text = [f"# Experiment 8: where the entropy objective looks ({len(per_seed)} seeds)\n\n",
            " ".join(__doc__.split()).split(" ", 2)[2] + "\n"]  # the docstring without its title
    every: List[Stats] = []
    drawn: List[Stats] = []
    totals: Dict[str, List[float]] = {}
    for label in ("main", "small"):
        stats = collect({s: d[label]["records"] for s, d in per_seed.items()})
        every += stats
        drawn = drawn or stats  # the figure shows the main pool
        some = per_seed[min(per_seed)][label]
        by = {s.method: s for s in stats}
        text.append(f"\n## {label}: {len(some['members'])} members, asked: {', '.join(some['asked'])}\n\n"
                    + bar_table(stats, some["asked"]))
        lines = ["| positions | FW | AdaMerging | FW at or above AdaMerging |", "| --- | ---: | ---: | --- |"]
        for positions, (fw, ada) in CHOICES.items():
            if fw in by and ada in by:
                each = {s: by[fw].by_seed()[s] >= by[ada].by_seed().get(s, float("inf")) for s in by[fw].seeds}
                lines.append(f"| {positions} | {shown(by[fw].normalized)} | {shown(by[ada].normalized)} | {holds(each)} |")
                totals.setdefault(positions, []).extend([*by[fw].normalized, *by[ada].normalized])
        if SAME_START in by and "adamerging" in by:
            same, ada = by[SAME_START], by["adamerging"]
            each = {s: same.by_seed()[s] >= ada.by_seed().get(s, float("inf")) for s in same.seeds}
            lines.append(f"| answer (1 position), FW from AdaMerging's start (TA 0.3) | {shown(same.normalized)} | "
                         f"{shown(ada.normalized)} | {holds(each)} |")
        text.append("\n" + "\n".join(lines) + "\n")
    best = max(totals, key=lambda k: sum(totals[k]) / len(totals[k]))
    text.append("\n## Choice\n\nMean normalised score of FW and AdaMerging together (they share the objective), "
                "over both cells and every seed, per choice: "
                + "; ".join(f"{k} {sum(v) / len(v):.1f}" for k, v in totals.items())
                + f". Highest: **{best}**.\n")
    bar_figure(figure, drawn, "Experiment 8: entropy positions (main pool)")
    return "".join(text), every


if __name__ == "__main__":
    main(run)
