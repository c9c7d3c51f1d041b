"""Adam's update as a pure function of its state, so a projected-gradient solve can
checkpoint the state beside the table and a killed run resumes with the same moments
(``torch.optim.Adam`` keeps them inside an optimiser object)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
