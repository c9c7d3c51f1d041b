"""The update rules of the stochastic solvers, one small type each (as FrankWolfe.jl
keeps step rules apart from the loop): given the iterate, one step's gradient and the
step number, the next iterate, inside the constraint set. Each rule's state is plain
JSON, so a killed solve resumes with the same moments or running average.

Adam is written out as a pure function of its state rather than taken from
``torch.optim``, which keeps its moments inside an optimiser object.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergekit_fw.solve.constraints import ConstraintSet


@dataclass
class AdamState:
    """First and second moment estimates and the number of steps taken."""

    first: torch.Tensor
    second: torch.Tensor
    steps: int = 0

    @classmethod
    def zeros_like(cls, values: torch.Tensor) -> AdamState:
        return cls(torch.zeros_like(values), torch.zeros_like(values), 0)

    def to_json(self) -> dict:
        return {"first": self.first.tolist(), "second": self.second.tolist(), "steps": self.steps}

    @classmethod
    def from_json(cls, data: dict) -> AdamState:
        return cls(
            torch.tensor(data["first"], dtype=torch.float64),
            torch.tensor(data["second"], dtype=torch.float64),
            int(data["steps"]),
        )


def adam_update(
    state: AdamState, gradient: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
) -> tuple[torch.Tensor, AdamState]:
    """The step to subtract and the next state: Kingma and Ba's Algorithm 1, in the
    arithmetic order of ``torch.optim.Adam`` (no weight decay, no amsgrad)."""
    beta1, beta2 = betas
    steps = state.steps + 1
    first = state.first * beta1 + gradient * (1 - beta1)
    second = state.second * beta2 + gradient * gradient * (1 - beta2)
    denominator = second.sqrt() / math.sqrt(1 - beta2**steps) + eps
    update = (lr / (1 - beta1**steps)) * first / denominator
    return update, AdamState(first, second, steps)


@dataclass
class ProjectedAdam:
    """An Adam step, then the set's exact Euclidean projection. ``shared``: one
    coefficient per candidate for the whole model (``lmo: task``), so the gradient is
    summed over the tensors and every column moves alike."""

    lr: float
    shared: bool = False
    adam: AdamState | None = None

    def step(self, constraint: ConstraintSet, weights: torch.Tensor, gradient: torch.Tensor, t: int) -> torch.Tensor:
        if self.shared:
            gradient = gradient.sum(dim=1, keepdim=True).expand_as(gradient).clone()
        update, self.adam = adam_update(self.adam or AdamState.zeros_like(weights), gradient, self.lr)
        return constraint.project(weights - update)

    def to_json(self) -> dict:
        return {"adam": self.adam.to_json()} if self.adam is not None else {}

    def load(self, data: dict) -> None:
        self.adam = AdamState.from_json(data["adam"]) if "adam" in data else None


@dataclass
class MomentumFrankWolfe:
    """Stochastic Frank-Wolfe with momentum (Mokhtari, Hassani and Karbasi, JMLR 2020,
    Algorithm 1): the LMO reads a running average of the batch gradients,
    ``d_t = (1 - rho_t) d_(t-1) + rho_t g_t`` with ``rho_t = 4 / (t + 8)^(2/3)``, and the
    iterate moves ``2 / (t + 8)`` of the way to its point. The average's noise shrinks
    faster than the step, which is what lets one batch per step converge where plain
    stochastic FW needs growing batches. The iterate stays a convex mix of extreme
    points, as in Frank-Wolfe."""

    rank: Callable[[torch.Tensor], torch.Tensor]  # the LMO's ranking of vertex scores
    average: torch.Tensor | None = None

    @staticmethod
    def rho(t: int) -> float:
        return min(1.0, 4.0 / (t + 8) ** (2.0 / 3.0))

    @staticmethod
    def gamma(t: int) -> float:
        return 2.0 / (t + 8)

    def step(self, constraint: ConstraintSet, weights: torch.Tensor, gradient: torch.Tensor, t: int) -> torch.Tensor:
        rho = self.rho(t)
        self.average = gradient if self.average is None else (1 - rho) * self.average + rho * gradient
        point = constraint.vertex(self.rank(self.average), weights.shape[1])
        return constraint.snap(weights + self.gamma(t) * (point - weights))

    def to_json(self) -> dict:
        return {"average": self.average.tolist()} if self.average is not None else {}

    def load(self, data: dict) -> None:
        self.average = torch.tensor(data["average"], dtype=torch.float64) if "average" in data else None


UpdateRule = ProjectedAdam | MomentumFrankWolfe
