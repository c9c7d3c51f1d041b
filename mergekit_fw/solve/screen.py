"""The screen (``screen_per_task``): which pool members a solve may use, chosen per asked task.

With many irrelevant members in the pool, every solver here lets some of them in: about
half of an irrelevant member's scores are negative at the start by the rows' noise alone,
the box's first point takes all of those, and each later step gives them its share. On
the calibration rows that costs nothing, so the solve cannot see it; on unseen rows of
the same tasks it does (full testbed, experiment 2: from 4 to 20 members the calibration
loss stayed at 0.041 while the held-out loss went 0.089 -> 0.160, and exact match fell 1-5
points).

An adapter trained for a task lowers that task's loss far faster than one that is not,
and the first gradient already measures it: per task and member, ``<grad_task, delta>``
summed over tensors (and over a LoRA's rank components, which sum to the whole adapter's
score). Keeping, for each asked task, the few members that score most negative on its
rows, and solving among those alone, kept the asked tasks' adapters (first or second for
their own task in 57 of 60 task-seed pairs on the full testbed with 20 tasks asked) and
dropped the irrelevant ones. It costs no pass of its own under hard FW (its first
gradient is taken per task anyway) and one under the gradient solvers. Where a task has
one specialist, its next places would go to members whose fall is the rows' noise, so
they need a fraction (``screen_floor``) of the first's fall.

The slope is a first-order reading: an adapter whose help on its own task is flat at the
base (a build of the full testbed's seed 1: firstbigger's own adapter, not among the 5
steepest on its rows) is ranked below unrelated members, and the screen holds it at 0.
``screen_by: loss`` ranks by what each member does alone instead: the task's loss with
that member merged at full weight, one forward pass per member. ``screen_by: both`` (the
default) keeps what either keeps: on the quick testbed's cells it kept the slope's members
or one more, and on that build it kept firstbigger's own adapter.

What the solve may not use is held at 0 by a :class:`~mergekit_fw.solve.constraints.Face`
of the constraint set, so the table, the outputs and a replay still name every member.
Members the starting point already uses, and the initial merge, are always kept. For the
rest of the solve the oracle leaves the held members out of its model (``apply_screen``),
so a pass costs what the kept members' does; the solve lets them go when it ends
(``screen_held``), so an oracle is never left holding for the next solve.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from mergekit_fw.pool.components import parent_name
from mergekit_fw.solve.constraints import ConstraintSet, Face
from mergekit_fw.solve.table import INIT_VERTEX, CoefficientTable

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Screen:
    per_task: int
    by_task: dict[str, list[str]]  # asked task -> the members that scored most negative on its rows
    kept: list[str]  # every member the solve may use, in pool order
    dropped: list[str]  # the others, held at 0
    floor: float = 0.0  # a member after a task's first needed this fraction of the first's score
    by: str = "slope"  # what ranked the members: the first gradient's slope, each one's loss alone, or both

    def to_json(self) -> dict:
        return {
            "per_task": self.per_task,
            "floor": self.floor,
            "by": self.by,
            "by_task": self.by_task,
            "kept": self.kept,
            "dropped": self.dropped,
        }

    @classmethod
    def from_json(cls, data: dict) -> Screen:
        return cls(
            int(data["per_task"]),
            {k: list(v) for k, v in data["by_task"].items()},
            list(data["kept"]),
            list(data["dropped"]),
            float(data.get("floor", 0.0)),  # traces written before the floor existed
            str(data.get("by", "slope")),  # and before screen_by
        )

    def held(self, candidates: list[str]) -> list[int]:
        """The candidate rows (0: the first candidate) of the dropped members."""
        dropped = set(self.dropped)
        return [row for row, name in enumerate(candidates) if parent_name(name) in dropped]

    def face(self, constraint: ConstraintSet, candidates: list[str]) -> ConstraintSet:
        """``constraint`` with every candidate row of a dropped member held at 0."""
        if not self.dropped:
            return constraint
        if isinstance(constraint, Face):
            raise ValueError("the screen restricts a constraint set once")
        held = set(self.held(candidates))
        return Face(constraint, (True, *(row not in held for row in range(len(candidates)))))


def members(candidates: list[str], always: Collection[str]) -> list[str]:
    """The pool members the rows belong to (a rank component's adapter), in pool order,
    without the rows in ``always`` (the initial merge), which are not screened."""
    seen: dict[str, None] = {}
    for name in candidates:
        if name not in always:
            seen.setdefault(parent_name(name), None)
    return list(seen)


def member_scores(
    task_scores: torch.Tensor, candidates: list[str], always: Collection[str] = ()
) -> tuple[list[str], torch.Tensor]:
    """The pool members (as :func:`members`) and, per task and member, the scores of
    its candidate rows summed: a LoRA's rank components sum to the whole adapter's."""
    names = members(candidates, always)
    index = {name: i for i, name in enumerate(names)}
    summed = torch.zeros(task_scores.shape[0], len(names), dtype=torch.float64)
    for row, name in enumerate(candidates):
        if name not in always:
            summed[:, index[parent_name(name)]] += task_scores[:, row].to(torch.float64)
    return names, summed


class TaskLossOracle(Protocol):
    def task_losses(self, coefficients: torch.Tensor) -> torch.Tensor: ...


def alone_falls(
    oracle: TaskLossOracle,
    candidates: list[str],
    n_tensors: int,
    always: Collection[str] = (),
    at_base: torch.Tensor | None = None,
) -> tuple[list[str], torch.Tensor, int]:
    """The pool members and, per task and member, how far the task's loss falls from the
    base's when the member alone is merged at full weight (every row of it at 1: the
    adapter or checkpoint as trained); negative where it falls. A member whose help on
    its task is flat at the base (its slope there near 0) still shows it here, where the
    first gradient does not. ``at_base``: the base's task losses, when already known.
    Returns the forward passes spent too (one per member, and the base's if not given)."""
    names = members(candidates, always)
    spent = 0
    if at_base is None:
        at_base = oracle.task_losses(torch.zeros(len(candidates), n_tensors, dtype=torch.float64))
        spent += 1
    falls = torch.zeros(len(at_base), len(names), dtype=torch.float64)
    for m, name in enumerate(tqdm(names, desc="screen: each member alone", leave=False)):
        alone = torch.zeros(len(candidates), n_tensors, dtype=torch.float64)
        for row, candidate in enumerate(candidates):
            if candidate not in always and parent_name(candidate) == name:
                alone[row] = 1.0
        falls[:, m] = oracle.task_losses(alone).to(torch.float64) - at_base.to(torch.float64)
        spent += 1
    return names, falls, spent


def screen_members(
    task_scores: torch.Tensor,
    candidates: list[str],
    tasks: list[str],
    per_task: int,
    *,
    floor: float = 0.0,
    always: Collection[str] = (),
    in_use: torch.Tensor | None = None,
) -> Screen:
    """Keep, for each task, the ``per_task`` members whose summed score on its rows is
    lowest (ties to the earlier member), and the members ``in_use`` (per candidate row:
    it has weight at the start). ``task_scores``: (n_tasks, n_candidates), each row one
    task's ``<grad, delta>`` per candidate, summed over tensors.

    After a task's first member, one is kept for it only if its score is at least
    ``floor`` times the first's (both falling): with no second specialist in the pool,
    the next places go to members whose scores are the rows' noise (0.1-7% of the
    first's on the testbeds, where the other second places were 10-71%)."""
    if task_scores.shape != (len(tasks), len(candidates)):
        raise ValueError(
            f"task scores of shape {tuple(task_scores.shape)} for {len(tasks)} tasks, {len(candidates)} candidates"
        )
    names, summed = member_scores(task_scores, candidates, always)
    return choose_members(names, summed, candidates, tasks, per_task, floor=floor, always=always, in_use=in_use)


def choose_members(
    names: list[str],
    summed: torch.Tensor,
    candidates: list[str],
    tasks: list[str],
    per_task: int,
    *,
    floor: float = 0.0,
    always: Collection[str] = (),
    in_use: torch.Tensor | None = None,
    by: str = "slope",
) -> Screen:
    """The screen from a (n_tasks, n_members) table of how steeply each member lowers
    each task's loss (more negative: steeper), whichever signal measured it (``by``)."""
    if summed.shape != (len(tasks), len(names)):
        raise ValueError(f"member scores of shape {tuple(summed.shape)} for {len(tasks)} tasks, {len(names)} members")
    by_task = {}
    for t, task in enumerate(tasks):
        order = sorted(range(len(names)), key=lambda i: (float(summed[t, i]), i))[:per_task]
        best = float(summed[t, order[0]]) if order else 0.0
        by_task[task] = [names[i] for n, i in enumerate(order) if n == 0 or _steep(float(summed[t, i]), best, floor)]
    chosen = {name for top in by_task.values() for name in top}
    if in_use is not None:
        chosen |= {parent_name(c) for c, used in zip(candidates, in_use.tolist()) if used and c not in always}
    return Screen(
        per_task,
        by_task,
        kept=[n for n in names if n in chosen],
        dropped=[n for n in names if n not in chosen],
        floor=floor,
        by=by,
    )


def _steep(score: float, best: float, floor: float) -> bool:
    """Whether a member's fall on a task (``score``) reaches ``floor`` of the first's
    (``best``); where nothing falls, only the first member counts."""
    if floor == 0.0:
        return True
    return best < 0.0 and score <= floor * best


def log_screen(screen: Screen) -> None:
    LOG.info(
        "screen: kept %d of %d members (up to the %d %s on each task's rows, after the first "
        "those at %g of its fall or more); held at 0: %s",
        len(screen.kept),
        len(screen.kept) + len(screen.dropped),
        screen.per_task,
        {
            "slope": "whose first gradient falls most steeply",
            "loss": "that lower its loss most alone",
            "both": "whose first gradient falls most steeply, or that lower its loss most alone,",
        }[screen.by],
        screen.floor,
        ", ".join(screen.dropped) or "none",
    )


def start_screen(
    task_scores: torch.Tensor,
    table: CoefficientTable,
    weights: torch.Tensor,
    per_task: int,
    floor: float = 0.0,
    *,
    by: str = "slope",
    oracle: TaskLossOracle | None = None,
    start_losses: torch.Tensor | None = None,
) -> tuple[Screen, int]:
    """The screen at a solve's starting point ``weights`` (the initial merge's vertex and
    the members the start uses are kept), logged, with the forward passes it spent.
    ``by``: 'slope' ranks by ``task_scores`` (the first gradient, per task); 'loss' by
    each member's loss alone (:func:`alone_falls`, through ``oracle``; ``start_losses``:
    the task losses at ``weights``, which are the base's when the start is the base, so that
    pass is not spent again); 'both' keeps what either keeps. Where the slope already
    keeps every member (each asked task's own adapter in a pool of them), the loss has
    nothing to add, and its pass per member is not spent."""
    tasks = [str(t) for t in table.meta.get("tasks", [])] or [f"task {t}" for t in range(task_scores.shape[0])]
    always = {INIT_VERTEX} if table.init is not None else set()
    in_use = (weights[1:] != 0).any(dim=1)
    screens: list[Screen] = []
    spent = 0
    if by in ("slope", "both"):
        names, slopes = member_scores(task_scores, table.candidates, always)
        screens.append(
            choose_members(
                names, slopes, table.candidates, tasks, per_task, floor=floor, always=always, in_use=in_use, by="slope"
            )
        )
    if by == "loss" or (by == "both" and screens[0].dropped):
        if oracle is None:
            raise ValueError(f"screen_by {by} needs the oracle")
        at_base = start_losses if not bool(in_use.any()) else None
        names, falls, spent = alone_falls(oracle, table.candidates, weights.shape[1], always, at_base)
        screens.append(
            choose_members(
                names, falls, table.candidates, tasks, per_task, floor=floor, always=always, in_use=in_use, by="loss"
            )
        )
    screen = joined(screens, names) if by == "both" else screens[0]
    log_screen(screen)
    return screen, spent


def joined(screens: list[Screen], names: list[str]) -> Screen:
    """What either screen keeps (``screen_by: both``): a task's places under each signal,
    in that order, and every member either kept, in pool order (``names``). One screen
    alone: the slope's, where it kept every member and the loss's was not taken."""
    first = screens[0]
    by_task = {task: list(dict.fromkeys(m for s in screens for m in s.by_task[task])) for task in first.by_task}
    chosen = {name for s in screens for name in s.kept}
    return Screen(
        first.per_task,
        by_task,
        kept=[n for n in names if n in chosen],
        dropped=[n for n in names if n not in chosen],
        floor=first.floor,
        by="both",
    )


class HoldingOracle(Protocol):
    def hold(self, rows: Collection[int]) -> None: ...


class _Traced(Protocol):
    screen: dict | None


@contextmanager
def screen_held(oracle: HoldingOracle, trace: _Traced) -> Iterator[None]:
    """One solve's extent of its screen's hold: however the solve ends, an oracle that
    held members for it holds none afterwards, so the next solve on it (another
    setting, a resumed one) sees the whole pool until its own screen."""
    try:
        yield
    finally:
        if trace.screen is not None and trace.screen["dropped"]:
            oracle.hold(())


def apply_screen(
    screen: Screen | dict | None, constraint: ConstraintSet, candidates: list[str], oracle: HoldingOracle
) -> ConstraintSet:
    """The set a solve moves in: ``constraint``, or its face when there is a screen
    (chosen now, or recorded in a resumed solve's trace); the oracle stops computing
    the dropped members, which stay at 0 from here on."""
    if screen is None:
        return constraint
    screen = Screen.from_json(screen) if isinstance(screen, dict) else screen
    if screen.dropped:
        oracle.hold(screen.held(candidates))
    return screen.face(constraint, candidates)
