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

    def to_json(self) -> dict:
        return {
            "per_task": self.per_task,
            "floor": self.floor,
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
    names = members(candidates, always)
    index = {name: i for i, name in enumerate(names)}
    summed = torch.zeros(len(tasks), len(names), dtype=torch.float64)
    for row, name in enumerate(candidates):
        if name not in always:
            summed[:, index[parent_name(name)]] += task_scores[:, row].to(torch.float64)
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
    )


def _steep(score: float, best: float, floor: float) -> bool:
    """Whether a member's fall on a task (``score``) reaches ``floor`` of the first's
    (``best``); where nothing falls, only the first member counts."""
    if floor == 0.0:
        return True
    return best < 0.0 and score <= floor * best


def log_screen(screen: Screen) -> None:
    LOG.info(
        "screen: kept %d of %d members (up to the %d scoring lowest on each task's rows, after the first "
        "those at %g of its score or more); held at 0: %s",
        len(screen.kept),
        len(screen.kept) + len(screen.dropped),
        screen.per_task,
        screen.floor,
        ", ".join(screen.dropped) or "none",
    )


def start_screen(
    task_scores: torch.Tensor, table: CoefficientTable, weights: torch.Tensor, per_task: int, floor: float = 0.0
) -> Screen:
    """The screen at a solve's starting point ``weights`` (the initial merge's vertex and
    the members the start uses are kept), logged."""
    tasks = [str(t) for t in table.meta.get("tasks", [])] or [f"task {t}" for t in range(task_scores.shape[0])]
    screen = screen_members(
        task_scores,
        table.candidates,
        tasks,
        per_task,
        floor=floor,
        always={INIT_VERTEX} if table.init is not None else set(),
        in_use=(weights[1:] != 0).any(dim=1),
    )
    log_screen(screen)
    return screen


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
