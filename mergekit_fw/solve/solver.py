"""The Frank-Wolfe loop (Algorithm 1 of the paper, hard and soft variants).

Each iteration: oracle (loss and scores at the current table), LMO (layer- or
task-wise ranking by inner product or cosine; the constraint set gives its best
point, :mod:`mergekit_fw.solve.constraints`), FW gap, then a step: hard FW moves
towards that point, or away from the worst point in use, or pairwise between them,
straight or along the set's projection (:mod:`mergekit_fw.solve.directions`), by a
searched step or an open-loop rule (:mod:`mergekit_fw.solve.steps`); soft FW solves
the small problem over the current iterate and the top-k points
(:mod:`mergekit_fw.solve.soft`). The loop never branches on the set. Every iterate is checked to be feasible. After each iteration the table
and trace are checkpointed, so an interrupted solve resumes where it was.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from tqdm.auto import tqdm

from mergekit_fw.config import SEARCHED_STEPS, FrankWolfeParameters
from mergekit_fw.files import write_json_atomic
from mergekit_fw.solve.constraints import ConstraintSet, describe, fw_gap, gain
from mergekit_fw.solve.directions import Direction, choose
from mergekit_fw.solve.lmo import ranking, vertex_norms, vertex_scores
from mergekit_fw.solve.penalty import WeightPenalty
from mergekit_fw.solve.screen import apply_screen, screen_held, start_screen
from mergekit_fw.solve.soft import solve_inner, unique_points
from mergekit_fw.solve.steps import adaptive, fixed, golden_section, quadratic, schedule
from mergekit_fw.solve.table import CoefficientTable

if TYPE_CHECKING:  # the oracle's result type; the solver itself only calls a LossOracle
    from mergekit_fw.oracle import Evaluation

LOG = logging.getLogger(__name__)


class LossOracle(Protocol):
    """What the solver needs from an oracle (see :class:`mergekit_fw.oracle.Oracle`)."""

    def loss(self, coefficients: torch.Tensor) -> float: ...

    def evaluate(self, coefficients: torch.Tensor, *, per_task: bool = False) -> Evaluation: ...

    def vertex_norms(self) -> torch.Tensor: ...

    def hold(self, rows: Collection[int]) -> None: ...

    def task_losses(self, coefficients: torch.Tensor) -> torch.Tensor: ...  # screen_by loss only


@dataclass
class IterationRecord:
    iteration: int
    loss: float
    gap: float  # FW gap (inner product, layer-wise: the optimality certificate)
    gain: float  # <-g, s - theta> of the best LMO point under the chosen ranking
    gamma: float | None  # hard FW's step; soft FW: 1 - mean weight theta_t kept
    loss_after: float | None
    chosen: dict[str, int]  # vertex -> number of tensors where the best point puts it at full weight
    choice: list[str]  # per tensor, the best point's vertex ('+'-joined candidates in the box)
    seconds: dict[str, float]
    line_search: list[tuple[float, float]] = field(default_factory=list)
    points: int = 1  # LMO points stepped towards (soft FW: top-k, unioned over tasks)
    inner: list[tuple[float, float, bool]] = field(default_factory=list)  # soft: (lr, loss, accepted)
    # passes over the calibration set this iteration: gradient (forward + backward), forward only
    passes: dict[str, float] = field(default_factory=dict)  # whole passes for FW; fractions per stochastic step
    # hard FW: the step taken (frank_wolfe, away or pairwise); soft FW: soft; a stochastic solver: its name
    direction: str = "frank_wolfe"
    # step adaptive: the curvature estimate carried to the next iteration (None: measure it)
    curvature: float | None = None


@dataclass
class Trace:
    iterations: list[IterationRecord] = field(default_factory=list)
    stopped: str | None = None
    final_loss: float | None = None
    initial_loss: float | None = None
    in_hull: bool = True  # False with merge_fn ties: the model may leave the convex hull
    resumed_at: list[int] = field(default_factory=list)  # iterations a killed run went on from
    # at the starting point, per calibration task and candidate: <grad_task, delta> summed over tensors
    task_scores: list[list[float]] | None = None
    # passes over the calibration set, all iterations and runs together (plus the final
    # loss and any answer decoding): what the solve spent
    passes: dict[str, float] = field(default_factory=lambda: {"gradient": 0, "forward": 0})
    # the resolved weight_penalty: loss per unit of weight (None without one)
    weight_penalty: float | None = None
    # screen_per_task: the members kept and held at 0 (mergekit_fw.solve.screen.Screen; None without one)
    screen: dict | None = None

    def to_json(self) -> dict:
        return {
            "passes": self.passes,
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "stopped": self.stopped,
            "in_hull": self.in_hull,
            "resumed_at": self.resumed_at,
            "task_scores": self.task_scores,
            "weight_penalty": self.weight_penalty,
            "screen": self.screen,
            "iterations": [vars(r) for r in self.iterations],
        }

    @classmethod
    def from_json(cls, data: dict) -> Trace:
        trace = cls(
            stopped=data.get("stopped"),
            final_loss=data.get("final_loss"),
            initial_loss=data.get("initial_loss"),
            in_hull=data.get("in_hull", True),
            resumed_at=list(data.get("resumed_at", [])),
            task_scores=data.get("task_scores"),
            passes=dict(data.get("passes", {"gradient": 0, "forward": 0})),
            weight_penalty=data.get("weight_penalty"),
            screen=data.get("screen"),
        )
        fields = IterationRecord.__dataclass_fields__
        trace.iterations = [
            IterationRecord(**{k: v for k, v in r.items() if k in fields}) for r in data.get("iterations", [])
        ]
        return trace


def step_size(params: FrankWolfeParameters, t: int) -> float:
    """The open-loop step rules (t counts from 0)."""
    if params.step == "schedule":
        return schedule(t)
    if params.step == "fixed":
        return fixed(params.gamma, t)
    raise ValueError(f"step {params.step!r} has no closed form")


class _Evaluator:
    """Evaluations at vertex weights, remembering the last one: the point a step
    accepted is where the next iteration starts, and its scores are already known."""

    def __init__(self, oracle: LossOracle, table: CoefficientTable, per_task: bool):
        self.oracle, self.table, self.per_task = oracle, table, per_task
        self._last: tuple[torch.Tensor, Evaluation] | None = None
        self.gradients = 0  # oracle calls made, each one pass over the calibration set
        self.forwards = 0

    def spent(self) -> dict[str, int]:
        return {"gradient": self.gradients, "forward": self.forwards}

    def __call__(self, weights: torch.Tensor, *, per_task: bool = False):
        if (
            self._last is not None
            and torch.equal(self._last[0], weights)
            and (not per_task or self._last[1].task_scores is not None)
        ):
            return self._last[1]
        evaluation = self.oracle.evaluate(self.table.coefficients_for(weights), per_task=self.per_task or per_task)
        self.gradients += 1
        self._last = (weights.clone(), evaluation)
        return evaluation

    def loss(self, weights: torch.Tensor) -> float:
        if self._last is not None and torch.equal(self._last[0], weights):
            return self._last[1].loss
        self.forwards += 1
        return self.oracle.loss(self.table.coefficients_for(weights))


def _search(
    evaluate: _Evaluator,
    constraint: ConstraintSet,
    anchor: torch.Tensor,
    move: Direction,
    loss: float,
    params: FrankWolfeParameters,
    curvature: float | None = None,
    penalty: WeightPenalty | None = None,
) -> tuple[float, float, list[tuple[float, float]], float | None]:
    """The searched step rules along ``move`` on [0, its largest feasible step];
    ``curvature``: step adaptive's estimate, carried in and out. With a ``penalty``,
    ``loss`` and what the search measures are the loss plus the weights' cost."""

    def phi(g: float) -> float:
        point = move.at(constraint, anchor, g)
        return evaluate.loss(point) + (penalty.cost(point) if penalty is not None else 0.0)

    if params.step == "line_search":
        return (*golden_section(phi, loss, params.line_search_steps, top=move.top), curvature)
    # the slope at gamma = 0 is <g, d>: known from the scores, without a pass
    if params.step == "adaptive":
        sq_norm = float(torch.sum(move.vector.to(torch.float64) ** 2))
        searched, curvature = adaptive(
            phi, loss, move.slope, sq_norm, curvature, params.line_search_steps, top=move.top
        )
        return (*searched, curvature)
    return (*quadratic(phi, loss, move.slope, params.line_search_steps, top=move.top), curvature)


def _soft_points(
    evaluation, rank_of, n_tensors: int, params: FrankWolfeParameters, constraint: ConstraintSet
) -> list[torch.Tensor]:
    scale = constraint.scale
    if params.top_k_per == "task" and evaluation.task_scores is not None and evaluation.task_scores.shape[0] > 1:
        points: list[torch.Tensor] = []
        for task_scores in evaluation.task_scores:
            points.extend(constraint.ranked(rank_of(vertex_scores(scale * task_scores)), n_tensors, params.top_k))
        return unique_points(points)
    return constraint.ranked(rank_of(vertex_scores(scale * evaluation.scores)), n_tensors, params.top_k)


def solve(
    oracle: LossOracle,
    table: CoefficientTable,
    params: FrankWolfeParameters,
    *,
    checkpoint: Path | None = None,
    trace: Trace | None = None,
    progress: bool = True,
    on_iteration: Callable[[CoefficientTable, IterationRecord], None] | None = None,
    rng_state: torch.Tensor | None = None,
) -> tuple[CoefficientTable, Trace]:
    """Run (or continue) Frank-Wolfe from ``table``.

    ``on_iteration`` sees the table after every step (tests check each iterate);
    ``rng_state``: the random state a checkpoint saved, so a resumed solve draws
    what the uninterrupted one would have.
    """
    trace = trace or Trace()
    with screen_held(oracle, trace):
        return _frank_wolfe(oracle, table, params, checkpoint, trace, progress, on_iteration, rng_state)


def _frank_wolfe(
    oracle: LossOracle,
    table: CoefficientTable,
    params: FrankWolfeParameters,
    checkpoint: Path | None,
    trace: Trace,
    progress: bool,
    on_iteration: Callable[[CoefficientTable, IterationRecord], None] | None,
    rng_state: torch.Tensor | None,
) -> tuple[CoefficientTable, Trace]:
    trace.in_hull = table.in_hull
    torch.manual_seed(params.seed)
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    n_tensors = table.weights.shape[1]
    # a resumed solve moves in the face its screen chose (the first iteration chooses it)
    constraint = apply_screen(trace.screen, table.constraint_set, table.candidates, oracle)
    constraint.check(table.weights)
    evaluate = _Evaluator(oracle, table, per_task=params.variant == "soft" and params.top_k_per == "task")
    # a cost per unit of weight (hard FW): resolved on the first gradient, then read from the trace
    penalty = WeightPenalty(params.weight_penalty, per_unit=trace.weight_penalty)
    norms = vertex_norms(oracle.vertex_norms()) if params.lmo_score == "cosine" else None

    def rank_of(vscores: torch.Tensor) -> torch.Tensor:
        return ranking(vscores, params.lmo, params.lmo_score, norms)

    start = len(trace.iterations)
    # step adaptive's curvature estimate: a resumed solve goes on with the one it had
    curvature = trace.iterations[-1].curvature if trace.iterations else None
    bar = tqdm(total=params.iterations, initial=start, desc=f"frank-wolfe ({params.variant})", disable=not progress)
    for t in range(start, params.iterations):
        tick = time.perf_counter()
        spent_before = evaluate.spent()
        first = trace.initial_loss is None
        evaluation = evaluate(table.weights, per_task=first)  # per task once, for the report
        loss = evaluation.loss
        if first:
            trace.initial_loss = loss
            if evaluation.task_scores is not None:
                per_candidate = evaluation.task_scores.sum(dim=2)
                trace.task_scores = [[float(x) for x in row] for row in per_candidate]
                if params.screen_per_task:  # by slope, from this gradient: no pass of its own
                    screen, spent = start_screen(
                        per_candidate,
                        table,
                        table.weights,
                        params.screen_per_task,
                        params.screen_floor,
                        by=params.screen_by,
                        oracle=oracle,
                        start_losses=evaluation.task_losses,
                    )
                    evaluate.forwards += spent
                    trace.screen = screen.to_json()
                    constraint = apply_screen(screen, constraint, table.candidates, oracle)
        t_oracle = time.perf_counter()
        # d loss / d weight: a unit of weight is worth ``scale`` of the candidate's coefficient
        vscores = penalty.applied(vertex_scores(constraint.scale * evaluation.scores))
        if trace.weight_penalty is None and penalty.per_unit is not None:
            LOG.info("weight_penalty %g: %.4g of loss per unit of weight", params.weight_penalty, penalty.per_unit)
            trace.weight_penalty = penalty.per_unit
        # what the steps lower: the loss plus the weights' cost (the loss alone without a penalty)
        objective = loss + penalty.cost(table.weights)
        gap = fw_gap(constraint, table.weights, vscores)
        best = constraint.vertex(rank_of(vscores), n_tensors)
        promised = gain(table.weights, vscores, best)
        t_lmo = time.perf_counter()
        searched: list[tuple[float, float]] = []
        inner_steps: list[tuple[float, float, bool]] = []
        n_points = 1
        taken = "frank_wolfe" if params.variant == "hard" else "soft"
        gamma: float | None
        stop: str | None
        first_gap = trace.iterations[0].gap if trace.iterations else gap
        if gap <= params.epsilon:
            gamma, loss_after, stop = 0.0, loss, f"gap {gap:.3g} <= epsilon {params.epsilon:g}"
        elif trace.iterations and gap <= params.epsilon_relative * first_gap:
            gamma, loss_after = 0.0, loss
            stop = f"gap {gap:.3g} <= epsilon_relative {params.epsilon_relative:g} x the first gap {first_gap:.3g}"
        elif params.variant == "soft":
            points = _soft_points(evaluation, rank_of, n_tensors, params, constraint)
            n_points = len(points)
            inner = solve_inner(
                lambda w: (lambda e: (e.loss, vertex_scores(e.scores)))(evaluate(w)),
                table.weights,
                points,
                (loss, vscores),
                steps=params.inner_steps,
                lr=params.inner_lr,
                layerwise=params.inner_weights == "layer",
            )
            inner_steps = inner.steps
            gamma = 1.0 - float(inner.lam[0].mean())
            loss_after = inner.loss
            stop = "soft step found no decrease" if inner.loss >= loss else None
            table.weights = inner.weights  # a mix of feasible points: feasible as it is
        else:
            move = choose(params.direction, constraint, table.weights, vscores, rank_of(vscores), best)
            if params.step in SEARCHED_STEPS:
                gamma, objective_after, searched, curvature = _search(
                    evaluate, constraint, table.weights, move, objective, params, curvature, penalty
                )
                if gamma == 0.0 and move.kind != "frank_wolfe":  # the away point gave nothing: plain FW decides
                    move = choose("frank_wolfe", constraint, table.weights, vscores, rank_of(vscores), best)
                    gamma, objective_after, more, curvature = _search(
                        evaluate, constraint, table.weights, move, objective, params, curvature, penalty
                    )
                    searched += more
                stop = "line search found no decrease" if gamma == 0.0 else None
                after = move.at(constraint, table.weights, gamma) if gamma > 0 else table.weights
                loss_after = objective_after - penalty.cost(after)
            else:
                gamma, loss_after, stop = min(step_size(params, t), 1.0), None, None
            taken = move.kind
            if gamma > 0:
                table.weights = constraint.snap(move.at(constraint, table.weights, gamma))
        constraint.check(table.weights)
        t_step = time.perf_counter()
        chosen, choice = describe(best, table.vertices)
        record = IterationRecord(
            iteration=t,
            loss=loss,
            gap=gap,
            gain=promised,
            gamma=gamma,
            loss_after=loss_after,
            chosen=chosen,
            choice=choice,
            seconds={"oracle": t_oracle - tick, "lmo": t_lmo - t_oracle, "step": t_step - t_lmo},
            line_search=searched,
            points=n_points,
            inner=inner_steps,
            passes={k: v - spent_before[k] for k, v in evaluate.spent().items()},
            direction=taken,
            curvature=curvature if params.step == "adaptive" else None,
        )
        trace.iterations.append(record)
        for kind, n in record.passes.items():
            trace.passes[kind] = trace.passes.get(kind, 0) + n
        if on_iteration is not None:
            on_iteration(table, record)
        LOG.info("iteration %d: loss %.5f gap %.4g gamma %s -> %s", t, loss, gap, gamma, loss_after)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", gap=f"{gap:.3g}")
        if stop is not None:
            trace.stopped = stop
            break
        if checkpoint is not None:
            save_checkpoint(checkpoint, table, trace)
    bar.close()
    if trace.stopped is None:
        trace.stopped = f"reached iterations = {params.iterations}"
    spent_before = evaluate.spent()
    last = trace.iterations[-1] if trace.iterations else None
    if last is not None and last.loss_after is not None:
        trace.final_loss = last.loss_after
    else:
        trace.final_loss = evaluate.loss(table.weights)
    for kind, n in evaluate.spent().items():  # the final loss, when no step measured it
        trace.passes[kind] = trace.passes.get(kind, 0) + n - spent_before[kind]
    return table, trace


@dataclass
class Checkpoint:
    """Everything a solve needs to go on after its last finished iteration."""

    table: CoefficientTable
    trace: Trace
    rng_state: torch.Tensor | None
    extra: dict = field(
        default_factory=dict
    )  # a stochastic solver's own state (its start, Adam's moments or the average)


def save_checkpoint(path: Path, table: CoefficientTable, trace: Trace, extra: dict | None = None) -> None:
    """Written atomically (temp file, fsync, rename): a kill leaves the old or the new one."""
    rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")
    data = {"table": table.to_json(), "trace": trace.to_json(), "torch_rng_state": rng}
    if extra:
        data["solver_state"] = extra
    write_json_atomic(path, data)


def load_checkpoint(path: Path) -> Checkpoint | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        rng = data.get("torch_rng_state")
        state = torch.frombuffer(bytearray(base64.b64decode(rng)), dtype=torch.uint8) if rng else None
        return Checkpoint(
            CoefficientTable.from_json(data["table"], str(path)),
            Trace.from_json(data["trace"]),
            state,
            dict(data.get("solver_state", {})),
        )
    except (ValueError, KeyError, TypeError) as error:
        LOG.warning("ignoring unreadable checkpoint %s (%s); starting over", path, error)
        return None
