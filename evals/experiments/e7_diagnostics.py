"""Experiment 7 (paper Figure 3 and the solver's health): the LMO's first-order scores per
candidate and asked task at the start, and the calibration loss and Frank-Wolfe gap per
iteration, from the main pool's Frank-Wolfe runs (shared with experiment 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from evals.experiments.cli import main
from evals.experiments.common import Context, run_cells, write_experiment
from evals.experiments.seeds import Stats, collect
from evals.methods import method

STEM = "exp7_diagnostics"
TRACED = ("fw_hard_layer", "fw_soft_task")


def run(ctx: Context) -> Path:
    cell = ctx.cell(ctx.main_members())
    records = run_cells(ctx, [(cell, method(n)) for n in TRACED], "exp7")
    tasks = {c["name"]: c["task"] for c in ctx.pool.candidates}
    return write_experiment(ctx, STEM, {"members": list(cell.members), "asked": list(cell.asked),
                                        "task_of": {m: tasks[m] for m in cell.members},
                                        "task_scores": records[0]["info"]["trace"]["task_scores"],
                                        "records": records}, summarize)


def hits(data: dict) -> int:
    """Asked tasks whose most negative LMO score at the start is one of their own adapters."""
    members, task_of = data["members"], data["task_of"]
    return sum(task_of[members[min(range(len(members)), key=lambda i: row[i])]] == task
               for task, row in zip(data["asked"], data["task_scores"]))


def summarize(per_seed: Dict[int, dict], figure: Path) -> Tuple[str, List[Stats]]:
    seed = min(per_seed)
    data = per_seed[seed]
    members, asked, task_of, scores = data["members"], data["asked"], data["task_of"], data["task_scores"]
    records = data["records"]
    lines = ["| asked task | most negative <grad, delta> (picked first) | its task | runner-up | own adapter's rank |",
             "| --- | --- | --- | --- | ---: |"]
    for task, row in zip(asked, scores):
        order = sorted(range(len(members)), key=lambda i: row[i])
        first, second = members[order[0]], members[order[1]]
        own_rank = 1 + next(k for k, i in enumerate(order) if task_of[members[i]] == task)
        lines.append(f"| {task} | {first} ({row[order[0]]:.3g}) | {task_of[first]} | {second} ({row[order[1]]:.3g}) | {own_rank} |")
    iteration_lines = ["| variant | iteration | loss | FW gap | step |", "| --- | ---: | ---: | ---: | ---: |"]
    for record in records:
        for it in record["info"]["trace"]["iterations"]:
            step = "" if it.get("gamma") is None else f"{it['gamma']:.3f}"
            iteration_lines.append(f"| {record['title']} | {it['iteration']} | {it['loss']:.4f} | {it['gap']:.4g} | {step} |")
    per_seed_hits = ", ".join(f"seed {s}: {hits(d)} of {len(d['asked'])}" for s, d in sorted(per_seed.items()))
    text = (f"# Experiment 7: diagnostics on the {len(members)}-member main pool (tables: seed {seed})\n\n"
            f"Asked tasks whose most negative LMO score at the base is one of their own adapters: {per_seed_hits}.\n\n"
            f"## LMO scores at the base, per asked task (from {records[0]['title']}'s first iteration)\n\n"
            + "\n".join(lines) + "\n\n## Loss and Frank-Wolfe gap per iteration\n\n" + "\n".join(iteration_lines) + "\n")
    _figure(figure, task_of, asked, members, scores, records)
    return text, collect({s: d["records"] for s, d in per_seed.items()})


def _figure(path: Path, task_of: Dict[str, str], asked, members, scores, records) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (heat, loss_ax, gap_ax) = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    scaled = [[value / max(abs(v) for v in row) for value in row] for row in scores]
    image = heat.imshow(scaled, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    heat.set_xticks(range(len(members)), members, rotation=60, ha="right", fontsize=7)
    heat.set_yticks(range(len(asked)), asked)
    for r, task in enumerate(asked):
        for c, member in enumerate(members):
            if task_of[member] == task:
                heat.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))
    heat.set_title("<grad_task, delta> at the base, / row max |.| (boxed: the task's own)", fontsize=9)
    fig.colorbar(image, ax=heat, fraction=0.03)
    for record in records:
        its = record["info"]["trace"]["iterations"]
        loss_ax.plot([it["iteration"] for it in its], [it["loss"] for it in its], marker="o", label=record["title"])
        gap_ax.plot([it["iteration"] for it in its], [max(it["gap"], 1e-12) for it in its], marker="o", label=record["title"])
    loss_ax.set(title="calibration loss", xlabel="iteration")
    gap_ax.set(title="Frank-Wolfe gap", xlabel="iteration", yscale="log")
    loss_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(run)
