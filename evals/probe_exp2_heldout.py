"""Probe (issue 17, goal 3): why Frank-Wolfe loses held-out accuracy as irrelevant adapters
join experiment 2's pool on the full testbed, at an unchanged calibration loss.

Run on a built workspace (``python -m evals.run --seeds S --tasks-only --only exp2_irrelevant
--work W`` builds it), from the repository root:

    python -m evals.probe_exp2_heldout W SEED N path            # held-out CE along the defaults' FW path
    python -m evals.probe_exp2_heldout W SEED N noise           # per-batch score noise at the base
    python -m evals.probe_exp2_heldout W SEED N cost Z [lmo]    # FW with a cost Z x SE(score) per coordinate
    python -m evals.probe_exp2_heldout W SEED N halves K        # K solves on disjoint 1/K of the rows, averaged
    python -m evals.probe_exp2_heldout W SEED N two_stage T     # per candidate, then per component on members >= T

``N`` is the cell's member count (the 4 asked tasks' own LoRAs, then the irrelevant ones in
experiment 2's order); one coefficient per LoRA rank component, every member taking part (the
defaults at 100 rows a task before the screen). Held-out rows: the first 100 test rows of
each asked task (what lm-eval scores by exact match), read here by teacher-forced
cross-entropy only. It prints; it writes nothing but the held-out rows' and the row parts'
files under ``W/full_SEED``. Its figures are quoted in
``evals/results/analysis/exp2_irrelevant_intel.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from evals.experiments.common import open_context
from evals.learned import Objective, _Session
from evals.methods import Cell
from mergekit_fw.config import FrankWolfeParameters
from mergekit_fw.solve import solver
from mergekit_fw.solve.lmo import vertex_scores
from mergekit_fw.solve.table import CoefficientTable
from testbed.data import read_rows


def fit_on(cell: Cell, calibration: Path, part: int, parts: int) -> _Session:
    """A session over the cell's calibration rows ``part``, ``part + parts``, ... of each task
    (every ``parts``-th row: disjoint parts of equal size)."""
    rows: dict[str, list[str]] = {}
    for line in calibration.read_text().splitlines():
        if line.strip():
            rows.setdefault(json.loads(line)["task"], []).append(line)
    path = calibration.parent.parent / f"probe_part{part}of{parts}.jsonl"
    path.write_text("".join(line + "\n" for task in rows.values() for line in task[part::parts]))
    return _Session(cell, path, Objective("cross_entropy"), granularity="rank_component")


def held_out_path(work: Path, seed: int) -> Path:
    return work / f"full_{seed}" / "probe_heldout.jsonl"


def sessions(work: Path, seed: int, n: int) -> tuple[_Session, _Session, Path, Cell, Path]:
    """The cell experiment 2 merges at ``n`` members (the asked tasks' own LoRAs, then the
    irrelevant ones in its order), its calibration rows and the held-out rows, each read by
    the baselines' oracle per rank component."""
    ctx = open_context("full", seed, work / f"full_{seed}", tasks_only=True)
    cell = ctx.cell([ctx.lora(task) for task in ctx.plan.asked] + ctx.irrelevant()[: n - len(ctx.plan.asked)])
    held_out = held_out_path(work, seed)
    with held_out.open("w") as out:
        for task in cell.asked:
            out.write("".join(f"{json.dumps(row)}\n" for row in read_rows(cell.pool.files[task].test, 100)))
    calibration = ctx.work.calibration(cell)
    objective = Objective("cross_entropy")
    return (_Session(cell, calibration, objective, granularity="rank_component"),
            _Session(cell, held_out, objective, granularity="rank_component"), cell.pool.base, cell, calibration)


def score_noise(fit: _Session) -> torch.Tensor:
    """Standard error of each coordinate's score at the base, from the spread of its
    per-batch scores within each task (the score is a sum over the batches)."""
    at_base = torch.zeros(fit.shape, dtype=torch.float64)
    per_batch = [(batch.task, fit.oracle.evaluate(at_base, batches=[batch]).scores) for batch in fit.oracle.batches]
    variance = torch.zeros(fit.shape, dtype=torch.float64)
    for task in {t for t, _ in per_batch}:
        scores = torch.stack([s for t, s in per_batch if t == task])
        variance += scores.shape[0] * scores.var(dim=0)
    return variance.sqrt()


def main() -> None:
    torch.set_num_threads(2)
    work, seed, n, what = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    fit, held, base, cell, calibration = sessions(work, seed, n)
    own = torch.tensor([name.split("#")[0] in cell.asked for name in fit.opened.names])
    if what == "noise":
        at_base = torch.zeros(fit.shape, dtype=torch.float64)
        total, se = fit.oracle.evaluate(at_base).scores, score_noise(fit)
        moved = total != 0
        for z in (0, 1, 2, 3):
            on = (total < -z * se) & moved
            print(f"score < -{z} SE: own {int(on[own].sum())}/{int(moved[own].sum())}, "
                  f"irrelevant {int(on[~own].sum())}/{int(moved[~own].sum())}")
        return
    if what == "cost":  # a cost z * SE per unit of each coordinate (LMO only with 'lmo')
        z, lmo_only = float(sys.argv[5]), len(sys.argv) > 6
        cost = vertex_scores(z * score_noise(fit))

        class NoiseCost:
            def __init__(self, *args: object, **kwargs: object) -> None:
                self.per_unit = None

            def applied(self, gradient: torch.Tensor) -> torch.Tensor:
                return gradient + cost

            def cost(self, weights: torch.Tensor) -> float:
                return 0.0 if lmo_only else float((cost * weights).sum())

        solver.WeightPenalty = NoiseCost  # type: ignore[misc, assignment]
    # the defaults of the time (the figures quoted were taken before the screen became one):
    # every member takes part, so that the probe measures the same solve on a later checkout
    params = FrankWolfeParameters(calibration="unused.jsonl", granularity="rank_component", screen_per_task=0)

    def fresh_table() -> CoefficientTable:
        table = CoefficientTable.at_base(fit.opened.names, fit.opened.tensor_names(), "probe", str(base))
        table.constraint = "box"
        return table

    def report(label: str, c: torch.Tensor) -> None:
        losses = held.oracle.evaluate(c).task_losses
        print(f"{label}: held-out {float(losses.sum()):.4f} {[round(float(x), 4) for x in losses]} "
              f"calibration {fit.oracle.loss(c):.4f} weight own {float(c[own].mean()):.3f} "
              f"irrelevant {float(c[~own].mean()) if bool((~own).any()) else 0.0:.3f}", flush=True)

    if what == "two_stage":  # members kept by a solve per candidate, then the defaults on them alone
        threshold = float(sys.argv[5])
        whole = _Session(cell, calibration, Objective("cross_entropy"), granularity="candidate")
        first = CoefficientTable.at_base(whole.opened.names, whole.opened.tensor_names(), "probe", str(base))
        first.constraint = "box"
        first, _ = solver.solve(whole.oracle, first, params.model_copy(update={"granularity": "candidate"}),
                                progress=False)
        means = whole.member_means(first.coefficients())
        whole.close()
        print("per candidate:", {name: round(value, 3) for name, value in means.items()}, flush=True)
        kept = Cell(cell.pool, tuple(name for name in cell.members if means[name] >= threshold), cell.asked, 100)
        print(f"kept {len(kept.members)} of {len(cell.members)}: {', '.join(kept.members)}", flush=True)
        fit2 = _Session(kept, calibration, Objective("cross_entropy"), granularity="rank_component")
        held2 = _Session(kept, held_out_path(work, seed),
                         Objective("cross_entropy"), granularity="rank_component")
        second = CoefficientTable.at_base(fit2.opened.names, fit2.opened.tensor_names(), "probe", str(base))
        second.constraint = "box"
        second, _ = solver.solve(fit2.oracle, second, params, progress=False)
        losses = held2.oracle.evaluate(second.coefficients()).task_losses
        print(f"two stages: held-out {float(losses.sum()):.4f} {[round(float(x), 4) for x in losses]} "
              f"calibration {fit2.oracle.loss(second.coefficients()):.4f}", flush=True)
        return
    if what == "halves":  # equal spend: K solves over 1/K of the rows each, their tables averaged
        parts = int(sys.argv[5])
        tables = []
        for part in range(parts):
            session = fit_on(cell, calibration, part, parts)
            solved, _ = solver.solve(session.oracle, fresh_table(), params, progress=False)
            tables.append(solved.coefficients())
            report(f"part {part} of {parts}", tables[-1])
            session.close()
        report("average", torch.stack(tables).mean(dim=0))
        return
    table = fresh_table()

    def seen(table: CoefficientTable, record: solver.IterationRecord) -> None:
        c = table.coefficients()
        losses = held.oracle.evaluate(c).task_losses
        print(f"iteration {record.iteration}: calibration {record.loss:.4f} held-out {float(losses.sum()):.4f} "
              f"{[round(float(x), 4) for x in losses]} weight own {float(c[own].mean()):.3f} "
              f"irrelevant {float(c[~own].mean()) if bool((~own).any()) else 0.0:.3f}", flush=True)

    solver.solve(fit.oracle, table, params, progress=False, on_iteration=seen)


if __name__ == "__main__":
    main()
