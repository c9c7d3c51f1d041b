"""Coefficients learned from the calibration rows by optimisers other than
Frank-Wolfe, on mergekit-fw's own gradient oracle, so each baseline sees exactly
FW's rows, objective and memory (one model plus the adapters' factors).

* :func:`layerwise`: one coefficient per candidate and tensor,
  ``theta = base + sum_i c[i, l] delta_i[l]``, started at 0.3, kept in [0, 1] and
  learned by Adam on one batch of 16 rows per task per step: AdaMerging's
  parametrisation (Yang et al. 2023). With ``objective="entropy"`` it is
  AdaMerging (lr 1e-3, 500 steps, as published); with ``cross_entropy`` it is what
  a user with labels would run first, learning the same coefficients by gradient
  descent on FW's own loss (lr 1e-2, 500 steps). The oracle's scores at a point are
  exactly ``d loss / d c[i, l]``, so a step is an Adam step on the score table.
* :func:`lorahub`: LoraHub (Huang et al. 2023): one weight per adapter, found by
  nevergrad's gradient-free search on the calibration loss plus
  ``0.05 * mean |w|``, weights in [-1.5, 1.5] starting at 0, budget 40 loss
  evaluations, as in LoraHub's ``lorahub_learning`` (which calls
  ``ng.optimizers.NGOpt``). LoraHub itself adds the adapters' A and B factors
  separately, which needs every adapter at one rank on the same modules; the pool
  mixes ranks and full fine-tunes, so the weights scale each member's task vector
  (``base + sum_i w_i delta_i``), the composition every other method here uses.

Every result says what it spent: passes over the calibration set, forward-only and
gradient (forward + backward), counted by the oracle in rows, and seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch

from mergekit_fw.calibration.batches import CalibrationBatch, CalibrationSet, build_calibration, pad_token_id
from mergekit_fw.solve.stochastic import step_batches
from testbed.sanity import pool_spec, write_coefficients

LOG = logging.getLogger(__name__)
ROWS_PER_STEP = 16  # AdaMerging's inputs per task per step


@dataclass(frozen=True)
class Objective:
    """The calibration objective, as mergekit-fw's settings of the same names define it."""

    name: str = "cross_entropy"
    entropy_positions: str = "answer"
    answer_tokens: int = 1

    def describe(self) -> Dict[str, object]:
        if self.name == "cross_entropy":
            return {"objective": self.name}
        return {"objective": self.name, "entropy_positions": self.entropy_positions, "answer_tokens": self.answer_tokens}


class _Session:
    """The base model behind mergekit-fw's oracle over the cell's members."""

    def __init__(self, cell, calibration_path: Path, objective: Objective, start: float = 0.0,
                 granularity: str = "candidate"):
        """``start``: the coefficient everywhere at the starting point, where more answer
        positions than one are decoded (as FW decodes them at its start); ``granularity``:
        mergekit-fw's setting of that name (``rank_component``: one row per LoRA rank component)."""
        from transformers import AutoTokenizer, LlamaForCausalLM

        from mergekit_fw.oracle import Oracle
        from mergekit_fw.pool.components import split_rank_components
        from mergekit_fw.pool.pool import open_pool

        self.opened = open_pool(pool_spec(cell.pool, cell.entries))
        if granularity == "rank_component":
            self.opened = split_rank_components(self.opened)
        tokenizer = AutoTokenizer.from_pretrained(str(cell.pool.base))
        model = LlamaForCausalLM.from_pretrained(str(cell.pool.base), dtype=torch.float32)
        self.calibration: CalibrationSet = build_calibration(
            calibration_path, tokenizer, samples_per_task=cell.per_task, batch_size=ROWS_PER_STEP, max_length=64,
            objective=objective.name, entropy_positions=objective.entropy_positions,
            answer_tokens=objective.answer_tokens)
        self.oracle = Oracle(model, self.opened, self.calibration)
        self.shape = (len(self.opened.candidates), len(self.opened.tensor_names()))
        self.oracle.decode_answers(torch.full(self.shape, start, dtype=torch.float64), pad_id=pad_token_id(tokenizer))
        self.batches: List[CalibrationBatch] = list(self.oracle.batches)

    def full_loss(self, coefficients: torch.Tensor) -> float:
        return self.oracle.loss(coefficients)

    def member_means(self, coefficients: torch.Tensor) -> Dict[str, float]:
        """Each member's coefficient averaged over the tensors it moves (and its rank components)."""
        from mergekit_fw.pool.components import parent_name

        tensors = self.opened.tensor_names()
        values: Dict[str, List[torch.Tensor]] = {}
        for row, (name, candidate) in enumerate(zip(self.opened.names, self.opened.candidates)):
            own = [column for column, tensor in enumerate(tensors) if tensor in candidate.tensor_names()]
            values.setdefault(parent_name(name), []).append(coefficients[row, own])
        return {name: float(torch.cat(parts).mean()) for name, parts in values.items()}

    def close(self) -> None:
        self.oracle.close()


def spend(passes: Dict[str, float], seconds: float) -> Dict[str, float]:
    return {"forward": round(passes.get("forward", 0.0), 2), "gradient": round(passes.get("gradient", 0.0), 2),
            "seconds": round(seconds, 1)}


def layerwise(cell, calibration_path: Path, out: Path, *, objective: Objective, steps: int, lr: float,
              init: float = 0.3, seed: int = 0, granularity: str = "candidate") -> Dict[str, object]:
    """Learn layer-wise coefficients with Adam, projected on [0, 1] after each step
    (``granularity rank_component``: one per LoRA rank component and tensor)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    session = _Session(cell, calibration_path, objective, start=init, granularity=granularity)
    coefficients = torch.full(session.shape, init, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=lr, betas=(0.9, 0.999))
    losses: List[float] = []
    try:
        initial = session.full_loss(coefficients.detach())
        for step in range(steps):
            evaluation = session.oracle.evaluate(coefficients.detach(), batches=step_batches(session.batches, step))
            losses.append(evaluation.loss)
            optimizer.zero_grad()
            coefficients.grad = evaluation.scores.clone()  # d loss / d c
            optimizer.step()
            with torch.no_grad():
                coefficients.clamp_(0.0, 1.0)
        final = session.full_loss(coefficients.detach())
        passes = session.oracle.passes()
    finally:
        session.close()
    write_coefficients(session.opened, coefficients.detach(), out, str(cell.pool.base))
    return {"optimiser": "adam", "steps": steps, "lr": lr, "init": init, "rows_per_step": ROWS_PER_STEP,
            **objective.describe(), **({"granularity": granularity} if granularity != "candidate" else {}),
            "coefficients": int(coefficients.numel()), "loss_initial": initial, "loss_first_steps": losses[:5],
            "loss_last_steps": losses[-5:], "loss_final": final,
            "mean_coefficients": session.member_means(coefficients.detach()),
            "spend": spend(passes, time.perf_counter() - started)}


def lorahub(cell, calibration_path: Path, out: Path, *, budget: int = 40, bound: float = 1.5, l1: float = 0.05,
            optimizer: str = "NGOpt", seed: int = 0) -> Dict[str, object]:
    """One weight per member by nevergrad on calibration cross-entropy + L1."""
    import nevergrad as ng
    import numpy as np

    started = time.perf_counter()
    np.random.seed(seed)
    session = _Session(cell, calibration_path, Objective())
    n = session.shape[0]
    parametrization = ng.p.Array(init=np.zeros(n), lower=-bound, upper=bound)
    parametrization.random_state = np.random.RandomState(seed)
    search = getattr(ng.optimizers, optimizer)(parametrization=parametrization, budget=budget)
    chosen = getattr(getattr(search, "optim", search), "name", optimizer)  # the optimiser NGOpt delegates to
    history: List[float] = []

    def score(weights) -> float:
        coefficients = torch.tensor(np.asarray(weights), dtype=torch.float64)[:, None].expand(session.shape)
        value = session.full_loss(coefficients.contiguous()) + l1 * float(np.abs(weights).mean())
        history.append(value)
        return value

    try:
        recommendation = search.minimize(score)
        weights = np.asarray(recommendation.value, dtype=np.float64)
        passes = session.oracle.passes()
    finally:
        session.close()
    coefficients = torch.tensor(weights, dtype=torch.float64)[:, None].expand(session.shape).contiguous()
    write_coefficients(session.opened, coefficients, out, str(cell.pool.base))
    return {"optimiser": f"nevergrad {optimizer}" + (f" (chose {chosen})" if chosen != optimizer else ""),
            "budget": budget, "bound": bound, "l1": l1, "objective": "cross_entropy",
            "weights": dict(zip(session.opened.names, map(float, weights))),
            "score_first": history[:3], "score_best": min(history) if history else None,
            "spend": spend(passes, time.perf_counter() - started)}
