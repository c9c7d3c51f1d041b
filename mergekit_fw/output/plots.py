"""``mergekit-fw report``: what a run did, as PNGs drawn from its table and trace.

Three figures, each readable on its own:

* ``fw_loss_gap.png``: the calibration loss and the Frank-Wolfe gap per iteration
  (the gap is the optimality certificate; it should fall towards 0);
* ``fw_coefficients.png``: the final coefficient table as a heatmap, tensors by
  vertices (the base included), so which candidate carries which block is visible;
* ``fw_lmo_scores.png``: the LMO's view of the pool at the starting point, per
  calibration task: how much each candidate's task vector lowers that task's loss to
  first order (``-<grad_task, delta>``, summed over tensors), the quantity the
  paper's Figure 3 shows. Irrelevant candidates sit near 0.
"""

from __future__ import annotations

import json
from pathlib import Path

FIGURES = ("fw_loss_gap.png", "fw_coefficients.png", "fw_lmo_scores.png")


def _short(name: str) -> str:
    """A readable label for a mergekit reference string (the adapter's or model's folder)."""
    tail = name.split("+")[-1].rstrip("/")
    return tail.split("/")[-1] or name


def draw_report(folder: Path, target: Path | None = None) -> list[Path]:
    """Draw the figures for the run whose ``fw_table.json``/``fw_trace.json`` are in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    folder = Path(folder)
    target = Path(target or folder)
    target.mkdir(parents=True, exist_ok=True)
    table_file, trace_file = folder / "fw_table.json", folder / "fw_trace.json"
    for path in (table_file, trace_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (is {folder} the output of a frank_wolfe merge?)")
    table = json.loads(table_file.read_text())
    trace = json.loads(trace_file.read_text())
    written = []
    for name, fig in zip(FIGURES, build_figures(table, trace)):
        fig.savefig(target / name, dpi=110)
        plt.close(fig)
        written.append(target / name)
    return written


def build_figures(table: dict, trace: dict) -> list:
    """The three figures, laid out, with every title and label inside the canvas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []

    iterations = trace.get("iterations", [])
    fig, (loss_ax, gap_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [it["iteration"] for it in iterations]
    losses = [it["loss"] for it in iterations]
    if trace.get("final_loss") is not None:
        steps_loss, losses = steps + [len(iterations)], losses + [trace["final_loss"]]
    else:
        steps_loss = steps
    loss_ax.plot(steps_loss, losses, marker="o")
    loss_ax.set(title="calibration loss", xlabel="iteration", ylabel="loss")
    gap_ax.plot(steps, [max(it["gap"], 1e-12) for it in iterations], marker="o", color="tab:red")
    gap_ax.set(title="Frank-Wolfe gap", xlabel="iteration", ylabel="gap", yscale="log")
    fig.suptitle(f"stopped: {trace.get('stopped')}", fontsize=9)
    fig.tight_layout()
    figures.append(fig)

    # the task vectors' coefficients: in the box and the scaled hull they are not the vertex
    # weights (a box's base row may be negative, a scaled hull's coefficients reach its radius)
    candidates = list(table["candidates"])
    tensors = list(table["coefficients"])
    matrix = [table["coefficients"][name] for name in tensors]  # rows: tensors, columns: candidates
    top = max([1.0, *(value for row in matrix for value in row)])
    fig, ax = plt.subplots(figsize=(max(5.0, 3.0 + 0.6 * len(candidates)), 1.5 + 0.12 * len(tensors)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
    ax.set_xticks(range(len(candidates)), [_short(v) for v in candidates], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(tensors)), tensors, fontsize=max(3, min(7, 400 // max(len(tensors), 1))))
    ax.set_title(f"coefficients (tensor x candidate), constraint {table.get('constraint') or 'hull'}")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    figures.append(fig)

    scores = trace.get("task_scores")
    tasks = table.get("meta", {}).get("tasks") or [f"task {i}" for i in range(len(scores or []))]
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * len(table["candidates"]) * max(1, len(tasks)) / 2, 3.8))
    if scores:
        width = 0.8 / len(tasks)
        for k, (task, row) in enumerate(zip(tasks, scores)):
            xs = [i + k * width for i in range(len(row))]
            ax.bar(xs, [-value for value in row], width=width, label=task)
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(table["candidates"]))],
            [_short(c) for c in table["candidates"]],
            rotation=45,
            ha="right",
            fontsize=7,
        )
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.legend(fontsize=7)
        ax.set(title="LMO at the start: first-order loss decrease per task", ylabel="-<grad, task vector>")
    else:
        ax.text(0.5, 0.5, "no per-task LMO scores in this trace", ha="center", va="center")
        ax.set_axis_off()
    fig.tight_layout()
    figures.append(fig)
    for fig in figures:
        fit_texts(fig)
    return figures


def texts_outside(fig) -> list[str]:
    """Titles and labels that run past the canvas (a cut-off title, say)."""
    if not hasattr(fig.canvas, "get_renderer"):  # a closed figure: lay it out on a fresh Agg canvas
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # layout only: the extents, without rasterizing
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    texts = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
    if getattr(fig, "_suptitle", None) is not None:
        texts.append(fig._suptitle)
    outside = []
    for text in texts:
        if not text.get_text() or not text.get_visible():
            continue
        extent = text.get_window_extent(renderer)
        if extent.x0 < box.x0 - 0.5 or extent.x1 > box.x1 + 0.5 or extent.y0 < box.y0 - 0.5 or extent.y1 > box.y1 + 0.5:
            outside.append(text.get_text())
    return outside


def fit_texts(fig) -> None:
    """Shrink, then wrap, any title or label that does not fit; lay out again."""
    import textwrap

    for _ in range(12):
        outside = set(texts_outside(fig))
        if not outside:
            return
        texts = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
        if getattr(fig, "_suptitle", None) is not None:
            texts.append(fig._suptitle)
        for text in texts:
            if text.get_text() not in outside:
                continue
            if text.get_fontsize() > 7:
                text.set_fontsize(text.get_fontsize() - 1)
            else:
                width = max(12, int(len(text.get_text().replace("\n", " ")) * 0.6))
                text.set_text(textwrap.fill(text.get_text().replace("\n", " "), width))
        fig.tight_layout()
