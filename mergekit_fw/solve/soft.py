"""Soft Frank-Wolfe's inner problem, as pure maths over the coefficient table.

Given the current vertex weights ``W`` (the anchor, theta_t) and K LMO points
s_1..s_K (vertex weights of points of the constraint set), find

    min_lambda  loss(lambda_0 * theta_t + sum_j lambda_j * s_j),   lambda on the simplex,

which is the paper's theta_t + sum_j lambda_j (s_j - theta_t) with
lambda_j >= 0 and sum_j lambda_j <= 1 (lambda_0 is what theta_t keeps; eq. 9
and the update after it). Keeping theta_t in the mix is what makes every outer
iteration unable to raise the loss: lambda = e_0 is feasible and is the start.
lambda is one simplex per tensor (layer-wise inner weights) or one for the model
(task-wise). Projected gradient descent: a step, then the exact sort-based
projection; a step that would raise the loss is refused and the rate halved.
Whatever the constraint set, a convex mix of its points lies in it, so projecting
lambda onto its simplex is the exact projection this problem needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mergekit_fw.solve.simplex import project_to_simplex

# weights -> (loss, vertex scores (n_vertices, n_tensors)) at that point
Evaluate = Callable[[torch.Tensor], tuple[float, torch.Tensor]]


def unique_points(points: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Drop repeated LMO points (the task-wise top-k of several tasks overlap)."""
    out: list[torch.Tensor] = []
    for point in points:
        if not any(torch.equal(point, seen) for seen in out):
            out.append(point)
    return out


def mix(anchor: torch.Tensor, points: Sequence[torch.Tensor], lam: torch.Tensor) -> torch.Tensor:
    """Vertex weights of lambda_0 * anchor + sum_j lambda_j * s_j; lam is (1+K, L) or (1+K,)."""
    n_tensors = anchor.shape[1]
    lam = lam if lam.dim() == 2 else lam.unsqueeze(1).expand(-1, n_tensors)
    weights = lam[0] * anchor
    for j, point in enumerate(points, start=1):
        weights = weights + lam[j] * point
    return weights


def lambda_gradient(
    anchor: torch.Tensor, points: Sequence[torch.Tensor], vscores: torch.Tensor, layerwise: bool
) -> torch.Tensor:
    """d loss / d lambda from the vertex scores at the current mix.

    d/d lambda_j[l] = <g_l, s_j[l] - base_l> (the constant <g_l, base_l> is shared
    by every coordinate of a simplex, so the projection ignores it).
    """
    rows = [(anchor * vscores).sum(dim=0)]
    rows.extend((point * vscores).sum(dim=0) for point in points)
    grad = torch.stack(rows)
    return grad if layerwise else grad.sum(dim=1)


@dataclass
class InnerResult:
    lam: torch.Tensor
    weights: torch.Tensor
    loss: float
    vscores: torch.Tensor  # at the accepted point (the next outer iteration reuses them)
    steps: list[tuple[float, float, bool]] = field(default_factory=list)  # (lr, loss tried, accepted)


def solve_inner(
    evaluate: Evaluate,
    anchor: torch.Tensor,
    points: Sequence[torch.Tensor],
    start: tuple[float, torch.Tensor],
    *,
    steps: int,
    lr: float,
    layerwise: bool,
) -> InnerResult:
    """Projected gradient descent from lambda = e_0 (theta_t itself, loss ``start[0]``)."""
    n_tensors = anchor.shape[1]
    shape = (1 + len(points), n_tensors) if layerwise else (1 + len(points),)
    lam = torch.zeros(shape, dtype=torch.float64)
    lam[0] = 1.0
    loss, vscores = start
    result = InnerResult(lam, anchor.clone(), loss, vscores)
    for _ in range(steps):
        grad = lambda_gradient(anchor, points, vscores, layerwise)
        trial = project_to_simplex(lam - lr * grad, dim=0)
        if torch.allclose(trial, lam, rtol=0.0, atol=1e-12):
            break  # projected gradient is zero: lambda is stationary
        weights = mix(anchor, points, trial)
        trial_loss, trial_vscores = evaluate(weights)
        accepted = trial_loss < loss
        result.steps.append((lr, trial_loss, accepted))
        if accepted:
            lam, loss, vscores = trial, trial_loss, trial_vscores
            result = InnerResult(lam, weights, loss, vscores, result.steps)
        else:
            lr /= 2.0
    return result
