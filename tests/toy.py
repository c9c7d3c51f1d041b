"""A convex toy problem with a known optimum, no model: a quadratic over the
convex hull of random points, one hull per tensor."""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
from scipy.optimize import minimize

from mergekit_fw.oracle import Evaluation
from mergekit_fw.solve.table import CoefficientTable


# The paper's Frank-Wolfe (mergekit-fw's defaults before issue 17): the toy tests check
# one algorithm at a time, so they start from these and name what they change.
PAPER_FW = {"iterations": 10, "step": "line_search", "direction": "frank_wolfe", "epsilon_relative": 0.0, "screen_per_task": 0}


def paper_settings(**settings: object) -> dict:
    """``settings`` over the paper's hard-FW settings (soft FW has no step rule)."""
    base = {k: v for k, v in PAPER_FW.items() if not (k == "step" and settings.get("variant") == "soft")}
    return {**base, **settings}


class QuadraticOracle:
    """loss(c) = sum_l ||base_l + sum_i c[i, l] d_i[l] - target_l||^2."""

    def __init__(self, n_candidates: int, n_tensors: int, dim: int, seed: int, inside: bool = False):
        """``inside``: the target is a random convex combination of the vertices, so
        the optimum is known exactly (loss 0); otherwise it is a random point."""
        g = torch.Generator().manual_seed(seed)
        self.base = torch.randn(n_tensors, dim, generator=g, dtype=torch.float64)
        self.deltas = torch.randn(n_candidates, n_tensors, dim, generator=g, dtype=torch.float64)
        if inside:
            weights = torch.rand(n_candidates + 1, n_tensors, generator=g, dtype=torch.float64)
            weights /= weights.sum(dim=0)
            self.target = self.point(weights[1:])
        else:
            self.target = self.base + torch.randn(n_tensors, dim, generator=g, dtype=torch.float64)
        self.evaluations = 0
        self.held: list[int] = []  # rows held at 0 now (``hold``)
        self.holds: list[list[int]] = []  # every hold asked for, in order

    def hold(self, rows) -> None:
        """As the model oracle: the held rows' scores read 0 until the next hold (the
        solvers must not need them), and a point that moves them is refused."""
        self.held = sorted(set(rows))
        self.holds.append(self.held)

    def _held(self, coefficients: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.held:
            assert not bool(coefficients[self.held].any()), "a point moves a held row"
            scores = scores.clone()
            scores[..., self.held, :] = 0.0
        return scores

    def point(self, coefficients: torch.Tensor) -> torch.Tensor:
        return self.base + torch.einsum("il,ild->ld", coefficients, self.deltas)

    def loss(self, coefficients: torch.Tensor) -> float:
        return float(((self.point(coefficients) - self.target) ** 2).sum())

    def task_losses(self, coefficients: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.loss(coefficients)], dtype=torch.float64)

    def evaluate(self, coefficients: torch.Tensor, *, per_task: bool = False) -> Evaluation:
        self.evaluations += 1
        residual = self.point(coefficients) - self.target
        scores = self._held(coefficients, 2 * torch.einsum("ld,ild->il", residual, self.deltas))
        loss = float((residual**2).sum())
        return Evaluation(loss, scores, torch.tensor([loss], dtype=torch.float64), scores.unsqueeze(0) if per_task else None)

    def vertex_norms(self) -> torch.Tensor:
        return self.deltas.norm(dim=2)

    def table(self, constraint: str = "hull", radius: Optional[float] = None) -> CoefficientTable:
        n, n_tensors = self.deltas.shape[:2]
        table = CoefficientTable.at_base([f"c{i}" for i in range(n)], [f"t{l}" for l in range(n_tensors)], "toy", "toy")
        table.constraint, table.radius = constraint, radius
        return table

    def optimum(self, constraint: str = "hull", radius: float = 1.0, per_unit: float = 0.0) -> float:
        """The minimum over the constraint set, per tensor by SLSQP on the coefficients:
        hull c >= 0, sum c <= 1; scaled_hull sum c <= radius; box 0 <= c <= 1; capped_box
        0 <= c <= 1 and sum c <= radius. With
        ``per_unit``, of the loss plus ``per_unit`` times the coefficients' total."""
        total = 0.0
        cap = {"hull": 1.0, "scaled_hull": radius, "box": None, "capped_box": radius}[constraint]
        upper = 1 if constraint in ("box", "capped_box") else None
        for l in range(self.base.shape[0]):
            deltas = self.deltas[:, l].numpy()
            offset = (self.base[l] - self.target[l]).numpy()
            k = len(deltas)

            def f(c):
                r = offset + c @ deltas
                return float(r @ r) + per_unit * float(c.sum())

            def grad(c):
                return 2 * deltas @ (offset + c @ deltas) + per_unit

            limits = [] if cap is None else [
                {"type": "ineq", "fun": lambda c, cap=cap: cap - c.sum(), "jac": lambda c: -np.ones(k)}
            ]
            result = minimize(
                f, np.zeros(k), jac=grad, bounds=[(0, upper)] * k, constraints=limits,
                method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000},
            )
            total += result.fun
        return total


class _Batch:
    """What the projected-gradient solver reads of a calibration batch: its task and rows."""

    def __init__(self, task: int, index: int, rows: int):
        self.task, self.index = task, index
        self.input_ids = torch.zeros(rows, 1, dtype=torch.long)


class BatchedQuadratic(QuadraticOracle):
    """The toy as a sum over tasks of the mean over each task's batches of
    ||point - target_tb||^2: a batch's share is (1 / B_t) of its own quadratic, so a
    step on one batch per task is a stochastic gradient of the whole loss, which is
    still a quadratic with the mean target (QuadraticOracle.optimum applies)."""

    def __init__(self, n_candidates: int, n_tensors: int, dim: int, seed: int, batches_per_task=(1,), rows: int = 4):
        super().__init__(n_candidates, n_tensors, dim, seed)
        g = torch.Generator().manual_seed(seed + 1000)
        self.batches = [_Batch(t, b, rows) for t, count in enumerate(batches_per_task) for b in range(count)]
        self.targets = {
            (b.task, b.index): self.target + 0.5 * torch.randn(self.target.shape, generator=g, dtype=torch.float64)
            for b in self.batches
        }
        self.counts = {t: c for t, c in enumerate(batches_per_task)}
        # the whole loss = sum_t mean_b ||p - T_tb||^2 = n_tasks ||p - mean T||^2 + const
        self.target = sum(self.targets.values()) / len(self.targets) if all(
            c == batches_per_task[0] for c in batches_per_task) else None
        self.rows_seen = {"forward": 0, "gradient": 0}
        self.total_rows = sum(int(b.input_ids.shape[0]) for b in self.batches)

    def _share(self, coefficients: torch.Tensor, batch) -> tuple[float, torch.Tensor]:
        residual = self.point(coefficients) - self.targets[(batch.task, batch.index)]
        weight = 1.0 / self.counts[batch.task]
        return weight * float((residual**2).sum()), weight * 2 * torch.einsum("ld,ild->il", residual, self.deltas)

    def loss(self, coefficients: torch.Tensor) -> float:
        self.rows_seen["forward"] += self.total_rows
        return sum(self._share(coefficients, b)[0] for b in self.batches)

    def task_losses(self, coefficients: torch.Tensor) -> torch.Tensor:
        self.rows_seen["forward"] += self.total_rows
        losses = torch.zeros(len(self.counts), dtype=torch.float64)
        for batch in self.batches:
            losses[batch.task] += self._share(coefficients, batch)[0]
        return losses

    def evaluate(self, coefficients: torch.Tensor, *, per_task: bool = False, batches=None) -> Evaluation:
        chosen = self.batches if batches is None else batches
        self.evaluations += 1
        self.rows_seen["gradient"] += sum(int(b.input_ids.shape[0]) for b in chosen)
        shares = [self._share(coefficients, b) for b in chosen]
        loss = sum(s[0] for s in shares)
        task_scores = None
        if per_task:  # each task's share of the scores, as the oracle gives them for the screen
            task_scores = torch.zeros(len(self.counts), *shares[0][1].shape, dtype=torch.float64)
            for batch, (_, scores) in zip(chosen, shares):
                task_scores[batch.task] += scores
            task_scores = self._held(coefficients, task_scores)
        scores = self._held(coefficients, sum(s[1] for s in shares))
        task_losses = torch.zeros(len(self.counts), dtype=torch.float64)  # per task, as the oracle gives them
        for batch, (share, _) in zip(chosen, shares):
            task_losses[batch.task] += share
        return Evaluation(loss, scores, task_losses, task_scores)

    def restricted(self, keep: list[int]) -> BatchedQuadratic:
        """The same problem over the candidates ``keep`` alone (for the optimum of a face)."""
        other = copy.copy(self)
        other.deltas = self.deltas[keep]
        other.rows_seen = dict(self.rows_seen)
        return other

    def passes(self) -> dict[str, float]:
        return {k: v / self.total_rows for k, v in self.rows_seen.items()}

    def optimum_loss(self, constraint: str = "hull", radius: float = 1.0, per_unit: float = 0.0) -> float:
        """The whole loss's minimum over the set: n_tasks * (the mean target's optimum) plus
        the targets' spread, which no point can remove; with ``per_unit``, of the loss plus
        ``per_unit`` times the coefficients' total."""
        n_tasks = len(self.counts)
        at_base = torch.zeros(self.deltas.shape[:2], dtype=torch.float64)
        spread = self.loss(at_base) - n_tasks * float(((self.point(at_base) - self.target) ** 2).sum())
        self.rows_seen["forward"] -= self.total_rows  # not the solver's spending
        return n_tasks * self.optimum(constraint, radius, per_unit / n_tasks) + spread
