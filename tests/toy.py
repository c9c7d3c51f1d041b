"""A convex toy problem with a known optimum, no model: a quadratic over the
convex hull of random points, one hull per tensor."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.optimize import minimize

from mergekit_fw.oracle import Evaluation
from mergekit_fw.solve.table import CoefficientTable


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

    def point(self, coefficients: torch.Tensor) -> torch.Tensor:
        return self.base + torch.einsum("il,ild->ld", coefficients, self.deltas)

    def loss(self, coefficients: torch.Tensor) -> float:
        return float(((self.point(coefficients) - self.target) ** 2).sum())

    def evaluate(self, coefficients: torch.Tensor, *, per_task: bool = False) -> Evaluation:
        self.evaluations += 1
        residual = self.point(coefficients) - self.target
        scores = 2 * torch.einsum("ld,ild->il", residual, self.deltas)
        loss = float((residual**2).sum())
        return Evaluation(loss, scores, torch.tensor([loss], dtype=torch.float64), scores.unsqueeze(0) if per_task else None)

    def vertex_norms(self) -> torch.Tensor:
        return self.deltas.norm(dim=2)

    def table(self, constraint: str = "hull", radius: Optional[float] = None) -> CoefficientTable:
        n, n_tensors = self.deltas.shape[:2]
        table = CoefficientTable.at_base([f"c{i}" for i in range(n)], [f"t{l}" for l in range(n_tensors)], "toy", "toy")
        table.constraint, table.radius = constraint, radius
        return table

    def optimum(self, constraint: str = "hull", radius: float = 1.0) -> float:
        """The minimum over the constraint set, per tensor by SLSQP on the coefficients:
        hull c >= 0, sum c <= 1; scaled_hull sum c <= radius; box 0 <= c <= 1."""
        total = 0.0
        cap = {"hull": 1.0, "scaled_hull": radius, "box": None}[constraint]
        for l in range(self.base.shape[0]):
            deltas = self.deltas[:, l].numpy()
            offset = (self.base[l] - self.target[l]).numpy()
            k = len(deltas)

            def f(c):
                r = offset + c @ deltas
                return float(r @ r)

            def grad(c):
                return 2 * deltas @ (offset + c @ deltas)

            limits = [] if cap is None else [
                {"type": "ineq", "fun": lambda c, cap=cap: cap - c.sum(), "jac": lambda c: -np.ones(k)}
            ]
            result = minimize(
                f, np.zeros(k), jac=grad, bounds=[(0, 1 if cap is None else None)] * k, constraints=limits,
                method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000},
            )
            total += result.fun
        return total
