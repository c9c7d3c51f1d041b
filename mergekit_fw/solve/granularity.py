"""``granularity: auto``: one coefficient per LoRA rank component where the evidence says it
pays, one per candidate elsewhere.

Measured on the testbeds (issue 17; ``evals/results/analysis/granularity_auto.md``): per
rank component Frank-Wolfe gains 3 to 12 points with 10 or 20 asked tasks and 3 to 4
with irrelevant adapters in the pool, is level on a 4-task pool at 50 and 100 rows a
task, and on one seed of two loses 4 and 10 points at 25 and 10 rows a task, where its
many coefficients fit the rows. So ``auto`` splits the LoRAs only where every
calibration task has at least :data:`RANK_ROWS` rows, and only in the setting those
numbers come from (the box, a convex merge, the layer-wise LMO, hard FW or a gradient
solver, labelled rows, a start at the base); a table given as ``init`` keeps the
granularity it was solved with.

A pure rule on what the run already knows before any maths: the choice enters the
solve's fingerprint as the resolved value, so a solve chosen this way and one that
named the same granularity are one cached solve.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mergekit_fw.config import FrankWolfeParameters
from mergekit_fw.pool.candidates import LoraCandidate
from mergekit_fw.pool.pool import Pool

# The fewest calibration rows on any task at which ``auto`` splits LoRAs into rank
# components (the quick testbed's 4-task pool: level from 50 rows a task, below under it)
RANK_ROWS = 50


@dataclass(frozen=True)
class GranularityChoice:
    granularity: str
    reason: str


def choose_granularity(
    params: FrankWolfeParameters,
    pool: Pool,
    rows_per_task: Mapping[str, int],
    init_granularity: str | None = None,
) -> GranularityChoice:
    """What ``auto`` resolves to for this run, and why (said in the log and the card).
    ``init_granularity``: that of the coefficient table given as ``init``, if one is."""
    if init_granularity is not None:
        return GranularityChoice(init_granularity, f"init is a table solved with granularity {init_granularity}")
    unmeasured = [
        (params.constraint != "box", f"constraint {params.constraint} (rank components are measured in the box)"),
        (params.merge_fn != "convex", f"merge_fn {params.merge_fn} (it trims whole task vectors)"),
        (params.lmo != "layer", f"lmo {params.lmo}"),
        (params.solver in ("frank_wolfe", "auto") and params.variant != "hard", f"variant {params.variant}"),
        (params.objective != "cross_entropy", f"objective {params.objective} (measured with labelled rows)"),
        (params.init.endswith((".yml", ".yaml")), "init is a mergekit merge (measured from the base)"),
    ]
    for applies, why in unmeasured:
        if applies:
            return GranularityChoice("candidate", why)
    if not any(isinstance(c, LoraCandidate) for c in pool.candidates):
        return GranularityChoice("candidate", "no LoRA adapter in the pool")
    fewest = min(rows_per_task.values(), default=0)
    if fewest < RANK_ROWS:
        task = min(rows_per_task, key=lambda t: rows_per_task[t]) if rows_per_task else "(none)"
        return GranularityChoice(
            "candidate",
            f"calibration task {task!r} has {fewest} rows (< {RANK_ROWS}: per rank component the "
            "coefficients outnumber what so few rows can fit)",
        )
    return GranularityChoice(
        "rank_component", f"LoRA adapters in the pool and at least {RANK_ROWS} calibration rows on every task"
    )


def resolve_granularity(
    params: FrankWolfeParameters,
    pool: Pool,
    rows_per_task: Mapping[str, int],
    init_granularity: str | None = None,
) -> tuple[FrankWolfeParameters, GranularityChoice | None]:
    """``params`` with ``granularity: auto`` replaced by its choice (None: it was set)."""
    if params.granularity != "auto":
        return params, None
    choice = choose_granularity(params, pool, rows_per_task, init_granularity)
    return params.model_copy(update={"granularity": choice.granularity}), choice
