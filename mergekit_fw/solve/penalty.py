"""A cost per unit of weight (``weight_penalty``), for the stochastic solvers and hard FW.

Frank-Wolfe with momentum builds its iterate as an average of 0/1 extreme points. A
coefficient whose batch gradients hover around 0 (a direction the calibration rows
neither want nor mind) is taken on about half the steps and settles near 0.5, where a
projected-gradient step would leave it near where it started. Those coefficients cost
nothing on the calibration loss and add noise elsewhere: on the full testbed with 20
asked tasks the momentum solver's iterate carried 51-70% more weight than projected
gradient's and scored 8 points less at the same calibration loss. A linear cost per
unit of weight makes such a coefficient's score positive, so the LMO stops taking it and
its weight decays towards 0; only what the rows pay for is taken (with 0.3 of the first
gradient's mean size, the same solver then scored level with projected gradient).

The cost is given as a fraction of the first step's mean absolute gradient, so one
setting does not depend on the model's gradient scale (a 4-layer toy's and a 7B's differ
by orders of magnitude); it does depend on the pool, since that mean is set by whichever
components dominate it. It is resolved once and then fixed: the penalised objective
``loss + per_unit * sum(weights)`` is one convex function for the whole solve, and its
FW gap is the gap the solvers record.

Hard FW takes the same cost: its LMO and gap read the penalised gradient, and its line
search measures the loss plus the cost, so a step still never raises what it lowers.

It works on the solvers' vertex layout, (1 + n_candidates, n_tensors) with the base's
row first: only the candidates' rows pay. (In the hull every column's vertex weights
sum to 1, so a cost on the base's row too would be a constant and change nothing.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class WeightPenalty:
    """``fraction`` of the first gradient's mean absolute entry, charged per unit of weight."""

    fraction: float
    per_unit: float | None = None  # resolved on the first gradient (the trace keeps it for a resume)

    def applied(self, gradient: torch.Tensor) -> torch.Tensor:
        """The penalised objective's gradient: the loss's, plus the cost of a unit of
        weight on every candidate's row (the first gradient's fixes that cost)."""
        if self.fraction == 0.0:
            return gradient
        if self.per_unit is None:
            self.per_unit = self.fraction * float(gradient[1:].abs().mean())
        penalised = gradient.clone()
        penalised[1:] += self.per_unit
        return penalised

    def cost(self, weights: torch.Tensor) -> float:
        """What ``weights`` pay: ``per_unit`` times the candidates' total weight (0 before
        the first gradient)."""
        return (self.per_unit or 0.0) * float(weights[1:].sum())
