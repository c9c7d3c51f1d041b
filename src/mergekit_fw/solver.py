"""The Frank-Wolfe loop (Algorithm 1 of the paper, hard variant, layer-wise LMO).

Each iteration: oracle (loss and scores at the current table), LMO (best vertex
per tensor), FW gap, step along ``s - theta`` by line search or the 2/(t+2)
schedule. Every iterate is checked to be feasible. After each iteration the
table and trace are checkpointed, so an interrupted solve resumes where it was.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from mergekit_fw.config import FrankWolfeParameters
from mergekit_fw.lmo import fw_gap, layerwise_choice, one_hot, vertex_scores
from mergekit_fw.simplex import check_feasible
from mergekit_fw.table import CoefficientTable, write_json_atomic

LOG = logging.getLogger(__name__)
_GOLDEN = (math.sqrt(5) - 1) / 2


class LossOracle:
    """What the solver needs from an oracle (see :class:`mergekit_fw.oracle.Oracle`)."""

    def loss(self, coefficients: torch.Tensor) -> float: ...

    def loss_and_scores(self, coefficients: torch.Tensor) -> Tuple[float, torch.Tensor]: ...


def golden_section(phi: Callable[[float], float], f0: float, evaluations: int) -> Tuple[float, float, List[Tuple[float, float]]]:
    """Minimise ``phi`` on [0, 1] with a fixed number of evaluations.

    Returns the best point seen, including gamma = 0 (value ``f0``, already
    known), so the loss can never increase; plus every (gamma, loss) evaluated.
    """
    seen: Dict[float, float] = {0.0: f0}

    def f(x: float) -> float:
        if x not in seen:
            seen[x] = phi(x)
        return seen[x]

    f(1.0)
    a, b = 0.0, 1.0
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    while len(seen) - 1 < evaluations:
        if f(c) <= f(d):
            b, d = d, c
            c = b - _GOLDEN * (b - a)
        else:
            a, c = c, d
            d = a + _GOLDEN * (b - a)
    best = min(seen, key=lambda x: (seen[x], x))
    return best, seen[best], sorted(seen.items())


@dataclass
class IterationRecord:
    iteration: int
    loss: float
    gap: float
    gamma: float
    loss_after: Optional[float]
    chosen: Dict[str, int]  # vertex -> number of tensors choosing it
    choice: List[str]  # chosen vertex per tensor, table order
    seconds: Dict[str, float]
    line_search: List[Tuple[float, float]] = field(default_factory=list)


@dataclass
class Trace:
    iterations: List[IterationRecord] = field(default_factory=list)
    stopped: Optional[str] = None
    final_loss: Optional[float] = None
    initial_loss: Optional[float] = None

    def to_json(self) -> dict:
        return {
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "stopped": self.stopped,
            "iterations": [vars(r) for r in self.iterations],
        }

    @classmethod
    def from_json(cls, data: dict) -> "Trace":
        trace = cls(stopped=data.get("stopped"), final_loss=data.get("final_loss"), initial_loss=data.get("initial_loss"))
        trace.iterations = [IterationRecord(**r) for r in data.get("iterations", [])]
        return trace


def solve(
    oracle: LossOracle,
    table: CoefficientTable,
    params: FrankWolfeParameters,
    *,
    checkpoint: Optional[Path] = None,
    trace: Optional[Trace] = None,
    progress: bool = True,
    on_iteration: Optional[Callable[[CoefficientTable, IterationRecord], None]] = None,
) -> Tuple[CoefficientTable, Trace]:
    """Run (or continue) hard, layer-wise Frank-Wolfe from ``table``.

    ``on_iteration`` sees the table after every step (tests check each iterate).
    """
    trace = trace or Trace()
    torch.manual_seed(params.seed)
    n_vertices = len(table.vertices)
    check_feasible(table.weights)
    start = len(trace.iterations)
    bar = tqdm(total=params.iterations, initial=start, desc="frank-wolfe", disable=not progress)
    for t in range(start, params.iterations):
        tick = time.perf_counter()
        loss, scores = oracle.loss_and_scores(table.coefficients())
        if trace.initial_loss is None:
            trace.initial_loss = loss
        t_oracle = time.perf_counter()
        vscores = vertex_scores(scores, table.init_coefficients)
        choice = layerwise_choice(vscores)
        gap = fw_gap(table.weights, vscores, choice)
        target = one_hot(choice, n_vertices)
        direction = target - table.weights
        t_lmo = time.perf_counter()
        searched: List[Tuple[float, float]] = []
        if gap <= params.epsilon:
            gamma, loss_after, stop = 0.0, loss, f"gap {gap:.3g} <= epsilon {params.epsilon:g}"
        elif params.step == "schedule":
            gamma, loss_after, stop = 2.0 / (t + 2.0), None, None
        else:
            base_weights = table.weights

            def phi(g: float) -> float:
                return oracle.loss(table.coefficients_for(base_weights + g * direction))

            gamma, loss_after, searched = golden_section(phi, loss, params.line_search_steps)
            stop = "line search found no decrease" if gamma == 0.0 else None
        if gamma > 0:
            table.weights = (table.weights + gamma * direction).clamp(min=0.0)
            table.weights /= table.weights.sum(dim=0, keepdim=True)
        check_feasible(table.weights)
        t_step = time.perf_counter()
        names = table.vertices
        record = IterationRecord(
            iteration=t,
            loss=loss,
            gap=gap,
            gamma=gamma,
            loss_after=loss_after,
            chosen={names[v]: int(n) for v, n in zip(*torch.unique(choice, return_counts=True))},
            choice=[names[v] for v in choice.tolist()],
            seconds={"oracle": t_oracle - tick, "lmo": t_lmo - t_oracle, "step": t_step - t_lmo},
            line_search=searched,
        )
        trace.iterations.append(record)
        if on_iteration is not None:
            on_iteration(table, record)
        LOG.info("iteration %d: loss %.5f gap %.4g gamma %.4f -> %s", t, loss, gap, gamma, loss_after)
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
    last = trace.iterations[-1] if trace.iterations else None
    if last is not None and last.loss_after is not None:
        trace.final_loss = last.loss_after
    else:
        trace.final_loss = oracle.loss(table.coefficients())
    return table, trace


def save_checkpoint(path: Path, table: CoefficientTable, trace: Trace) -> None:
    write_json_atomic(path, {"table": table.to_json(), "trace": trace.to_json()})


def load_checkpoint(path: Path) -> Optional[Tuple[CoefficientTable, Trace]]:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return CoefficientTable.from_json(data["table"], str(path)), Trace.from_json(data["trace"])
