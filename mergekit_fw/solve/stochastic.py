"""The stochastic solvers: one batch of every calibration task per step, an update
rule (:mod:`mergekit_fw.solve.updates`) that keeps the iterate in the constraint set.

Frank-Wolfe spends a full pass over the calibration set on every gradient and moves
along one extreme point at a time: sparse, certified by its gap, but few moves for
the passes. With labels and many asked tasks, many small stochastic steps reach a
lower loss for the same passes (evals/results, experiments 1 and 3), so the same
oracle, table and constraint sets are offered to two such solvers:
``projected_gradient`` (Adam, then the set's projection) and
``stochastic_frank_wolfe`` (the LMO on a running average of the batch gradients).
Both keep Frank-Wolfe's guarantee that the result is never worse on the calibration
loss than the start (on the loss plus the weights' cost, with a ``weight_penalty``): the
start and the last point are both evaluated on the whole set, and the better one is kept.

A step's record carries the FW gap of that step's (stochastic) gradient, an
estimate of how far from stationary the iterate is, not a certificate. With a
``weight_penalty`` (:mod:`mergekit_fw.solve.penalty`) the gradient and the gap are the
penalised objective's; the recorded losses stay the calibration loss.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

import torch
from tqdm.auto import tqdm

from mergekit_fw.config import FrankWolfeParameters, ParameterError
from mergekit_fw.solve.constraints import fw_gap
from mergekit_fw.solve.lmo import ranking, vertex_norms, vertex_scores
from mergekit_fw.solve.penalty import WeightPenalty
from mergekit_fw.solve.screen import apply_screen, screen_held, start_screen
from mergekit_fw.solve.solver import IterationRecord, Trace, save_checkpoint
from mergekit_fw.solve.table import CoefficientTable
from mergekit_fw.solve.updates import MomentumFrankWolfe, ProjectedAdam, UpdateRule

LOG = logging.getLogger(__name__)
CHECKPOINT_EVERY = 10  # steps between checkpoints (a step is a fraction of a pass)


class BatchOracle(Protocol):
    """What these solvers need from an oracle: its batches (with their task) and an
    evaluation on some of them (see :class:`mergekit_fw.oracle.Oracle`)."""

    batches: list

    def loss(self, coefficients: torch.Tensor) -> float: ...

    def evaluate(self, coefficients: torch.Tensor, *, per_task: bool = False, batches: list | None = None): ...

    def passes(self) -> dict[str, float]: ...

    def vertex_norms(self) -> torch.Tensor: ...

    def hold(self, rows: Collection[int]) -> None: ...

    def task_losses(self, coefficients: torch.Tensor) -> torch.Tensor: ...  # screen_by loss only


def step_batches(batches: Sequence, step: int) -> list:
    """One batch of every task for step ``step``, cycling through each task's batches
    in order (a task with fewer batches comes round sooner)."""
    by_task: dict[int, list] = {}
    for batch in batches:
        by_task.setdefault(int(batch.task), []).append(batch)
    return [own[step % len(own)] for _, own in sorted(by_task.items())]


def update_rule(params: FrankWolfeParameters, oracle: BatchOracle) -> UpdateRule:
    """The rule the ``solver`` setting names."""
    if params.solver == "projected_gradient":
        return ProjectedAdam(params.learning_rate, shared=params.lmo == "task")
    if params.solver == "stochastic_frank_wolfe":
        norms = vertex_norms(oracle.vertex_norms()) if params.lmo_score == "cosine" else None
        return MomentumFrankWolfe(lambda scores: ranking(scores, params.lmo, params.lmo_score, norms))
    raise ValueError(f"solver {params.solver!r} is not a stochastic solver")


def solve_stochastic(
    oracle: BatchOracle,
    table: CoefficientTable,
    params: FrankWolfeParameters,
    *,
    checkpoint=None,
    trace: Trace | None = None,
    state: dict | None = None,
    progress: bool = True,
    on_iteration: Callable[[CoefficientTable, IterationRecord], None] | None = None,
) -> tuple[CoefficientTable, Trace]:
    """Run (or continue, from a checkpoint's ``state``) the stochastic solve from ``table``."""
    trace = trace or Trace()
    with screen_held(oracle, trace):
        return _stochastic(oracle, table, params, checkpoint, trace, state, progress, on_iteration)


def _stochastic(
    oracle: BatchOracle,
    table: CoefficientTable,
    params: FrankWolfeParameters,
    checkpoint,
    trace: Trace,
    state: dict | None,
    progress: bool,
    on_iteration: Callable[[CoefficientTable, IterationRecord], None] | None,
) -> tuple[CoefficientTable, Trace]:
    trace.in_hull = table.in_hull
    constraint = apply_screen(trace.screen, table.constraint_set, table.candidates, oracle)
    constraint.check(table.weights)
    if (
        params.solver == "projected_gradient"
        and params.lmo == "task"
        and not bool((table.weights == table.weights[:, :1]).all())
    ):
        raise ParameterError(
            "lmo",
            "task with solver projected_gradient learns one coefficient per candidate for the "
            "whole model, but the starting point (init) varies by tensor; use lmo: layer",
        )
    state = state or {}
    start = torch.tensor(state["start"], dtype=torch.float64) if "start" in state else table.weights.clone()
    rule = update_rule(params, oracle)
    rule.load(state.get("rule", {}))
    # the cost resolved on the first step is kept in the trace, so a resumed solve pays the same
    penalty = WeightPenalty(params.weight_penalty, per_unit=trace.weight_penalty)
    full = list(oracle.batches)
    if trace.initial_loss is None:
        before = oracle.passes()
        if params.screen_per_task:  # the start's gradient per task (one pass), for the screen
            first = oracle.evaluate(table.coefficients_for(start), per_task=True)
            trace.initial_loss = first.loss
            task_scores = first.task_scores.sum(dim=2)
            trace.task_scores = [[float(x) for x in row] for row in task_scores]
            screen, _ = start_screen(
                task_scores,
                table,
                start,
                params.screen_per_task,
                params.screen_floor,
                by=params.screen_by,
                oracle=oracle,
                start_losses=first.task_losses,
            )  # its forward passes are the oracle's: counted below
            trace.screen = screen.to_json()
            constraint = apply_screen(screen, constraint, table.candidates, oracle)
        else:
            trace.initial_loss = oracle.loss(table.coefficients_for(start))
        after = oracle.passes()
        for kind in after:
            trace.passes[kind] = trace.passes.get(kind, 0) + after[kind] - before[kind]
    rows_total = sum(int(b.input_ids.shape[0]) for b in full)

    def save() -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, table, trace, extra={"start": start.tolist(), "rule": rule.to_json()})

    done = len(trace.iterations)
    bar = tqdm(total=params.gradient_steps, initial=done, desc=params.solver.replace("_", " "), disable=not progress)
    for t in range(done, params.gradient_steps):
        tick = time.perf_counter()
        before = oracle.passes()
        chosen = step_batches(full, t)
        evaluation = oracle.evaluate(table.coefficients_for(table.weights), batches=chosen)
        # d loss / d weight: a unit of weight is worth ``scale`` of the candidate's coefficient
        gradient = vertex_scores(constraint.scale * evaluation.scores)
        resolved = penalty.per_unit
        gradient = penalty.applied(gradient)
        if resolved is None and penalty.per_unit is not None:
            LOG.info("weight_penalty %g: %.4g of loss per unit of weight", params.weight_penalty, penalty.per_unit)
        trace.weight_penalty = penalty.per_unit
        t_oracle = time.perf_counter()
        gap = fw_gap(constraint, table.weights, gradient)
        table.weights = rule.step(constraint, table.weights, gradient, t)
        constraint.check(table.weights)
        rows = sum(int(b.input_ids.shape[0]) for b in chosen)
        after = oracle.passes()
        record = IterationRecord(
            iteration=t,
            loss=evaluation.loss * rows_total / max(rows, 1),  # the batches' share, scaled to the whole set
            gap=gap,
            gain=gap,
            gamma=params.learning_rate if isinstance(rule, ProjectedAdam) else MomentumFrankWolfe.gamma(t),
            loss_after=None,
            chosen={},
            choice=[],
            seconds={"oracle": t_oracle - tick, "lmo": 0.0, "step": time.perf_counter() - t_oracle},
            passes={k: after[k] - before[k] for k in after},
            direction=params.solver,
        )
        trace.iterations.append(record)
        for kind, n in record.passes.items():
            trace.passes[kind] = trace.passes.get(kind, 0) + n
        if on_iteration is not None:
            on_iteration(table, record)
        bar.update(1)
        bar.set_postfix(loss=f"{record.loss:.4f}")
        if (t + 1) % CHECKPOINT_EVERY == 0:
            save()
    bar.close()
    before = oracle.passes()
    final = oracle.loss(table.coefficients_for(table.weights))
    trace.passes["forward"] = trace.passes.get("forward", 0) + oracle.passes()["forward"] - before["forward"]
    # with a weight penalty, what the solve lowers is the loss plus the weights' cost
    if final + penalty.cost(table.weights) > trace.initial_loss + penalty.cost(start):
        LOG.warning(
            "%s ended at calibration loss %.5f (%.5f with the weight penalty), above the start's %.5f (%.5f): "
            "keeping the start",
            params.solver,
            final,
            final + penalty.cost(table.weights),
            trace.initial_loss,
            trace.initial_loss + penalty.cost(start),
        )
        table.weights = start
        trace.final_loss = trace.initial_loss
        trace.stopped = f"reached gradient_steps = {params.gradient_steps}; its loss {final:.5g} was above the start's, kept the start"
    else:
        trace.final_loss = final
        trace.stopped = f"reached gradient_steps = {params.gradient_steps}"
    return table, trace
