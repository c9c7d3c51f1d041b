"""Pure maths of the linear minimisation oracle and the Frank-Wolfe gap.

Vertices per tensor are: the base (delta 0, score 0), each candidate (its score),
and optionally the initial merge (its coefficients dotted with the scores). The
state is a (n_vertices, n_tensors) table of convex weights, one simplex per tensor.
"""

from __future__ import annotations

from typing import Optional

import torch


def vertex_scores(scores: torch.Tensor, init_coefficients: Optional[torch.Tensor] = None) -> torch.Tensor:
    """<grad, vertex - theta_0> per vertex and tensor, (n_vertices, n_tensors)."""
    rows = [torch.zeros(1, scores.shape[1], dtype=scores.dtype), scores]
    if init_coefficients is not None:
        rows.append((init_coefficients.to(scores.dtype) * scores).sum(dim=0, keepdim=True))
    return torch.cat(rows, dim=0)


def layerwise_choice(vscores: torch.Tensor) -> torch.Tensor:
    """Best vertex per tensor (block-coordinate LMO); ties go to the lowest index,
    so an all-zero column keeps the base."""
    return torch.argmin(vscores, dim=0)


def one_hot(choice: torch.Tensor, n_vertices: int) -> torch.Tensor:
    out = torch.zeros(n_vertices, choice.shape[0], dtype=torch.float64)
    out[choice, torch.arange(choice.shape[0])] = 1.0
    return out


def fw_gap(weights: torch.Tensor, vscores: torch.Tensor, choice: torch.Tensor) -> float:
    """<-g, s - theta> summed over tensors; >= 0 because s minimises each column."""
    current = (weights * vscores).sum(dim=0)
    chosen = vscores.gather(0, choice.unsqueeze(0)).squeeze(0)
    return float((current - chosen).sum())


def candidate_coefficients(weights: torch.Tensor, n_candidates: int, init_coefficients: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The coefficient of each task vector implied by the vertex weights."""
    coefficients = weights[1 : 1 + n_candidates].clone()
    if init_coefficients is not None:
        coefficients += weights[1 + n_candidates].unsqueeze(0) * init_coefficients
    return coefficients
