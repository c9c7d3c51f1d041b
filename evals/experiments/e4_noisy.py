"""Experiment 4 (paper Figure 1c): the main pool plus adapters trained from another initialisation."""

from __future__ import annotations

from pathlib import Path

from evals.experiments.cli import main
from evals.experiments.common import Context, bar_figure, run_cells, write_experiment
from evals.methods import SCALING, method

STEM = "exp4_noisy"


def run(ctx: Context) -> Path:
    clean = ctx.cell(ctx.main_members())
    noisy = ctx.cell(ctx.main_members() + ctx.noisy())
    before = run_cells(ctx, [(clean, method(n)) for n in SCALING], "exp4 clean")
    after = run_cells(ctx, [(noisy, method(n)) for n in SCALING], "exp4 noisy")
    lines = ["| method | main pool | + noisy | change |", "| --- | ---: | ---: | ---: |"]
    for b, a in zip(before, after):
        lines.append(f"| {b['title']} | {b['normalized']:.1f} | {a['normalized']:.1f} | {a['normalized'] - b['normalized']:+.1f} |")
    shown = [{**a, "title": a["title"] + " (+noisy)"} for a in after]
    text = (f"# Experiment 4: noisy (misinitialised) adapters added: {', '.join(ctx.noisy())}\n\n"
            f"Each noisy LoRA was trained on a base from another initialisation and is applied to ours, as a "
            f"mislabelled download would be.\n\n" + "\n".join(lines) + "\n")
    return write_experiment(ctx, STEM, {"clean": before, "noisy": after}, text,
                            lambda p: bar_figure(p, [x for pair in zip(before, shown) for x in pair], "Experiment 4: + noisy adapters"))


if __name__ == "__main__":
    main(run)
