"""Pure maths of the linear minimisation oracle's ranking.

Rows per tensor are the base (delta 0, score 0) and each candidate (its score;
the initial merge, when there is one, is the last candidate). The state is a
(n_vertices, n_tensors) table of vertex weights.

The layer-wise LMO ranks per column, the task-wise LMO ranks rows by their score
summed over the model. Ranking can use the raw inner product (the paper) or the
cosine (the authors' code); the FW gap always uses the inner product, because only
it certifies optimality. Which points exist, and so the LMO's answer and the gap,
depends on the constraint set (:mod:`mergekit_fw.solve.constraints`); in the hull
a point is one vertex per tensor, a (n_tensors,) index vector here.
"""

from __future__ import annotations

import torch

LMO_KINDS = ("layer", "task")
SCORE_KINDS = ("inner_product", "cosine")


def vertex_scores(scores: torch.Tensor) -> torch.Tensor:
    """<grad_l, vertex_l - base_l> per vertex and tensor, (1 + n_candidates, n_tensors)."""
    return torch.cat([torch.zeros(1, scores.shape[1], dtype=scores.dtype), scores], dim=0)


def vertex_norms(norms: torch.Tensor) -> torch.Tensor:
    """||vertex_l - base_l|| per vertex and tensor, base first (norm 0)."""
    return torch.cat([torch.zeros(1, norms.shape[1], dtype=norms.dtype), norms], dim=0)


def ranking(vscores: torch.Tensor, lmo: str, score: str, vnorms: torch.Tensor | None = None) -> torch.Tensor:
    """What the LMO minimises: (n_vertices, n_tensors) for 'layer', (n_vertices,) for 'task'.

    Cosine divides by the vertex's norm only: the gradient's norm is one positive
    factor per tensor (layer-wise) or per model (task-wise) and changes no ranking
    or sign. A zero delta (the base, or a candidate that leaves a tensor alone)
    ranks 0.
    """
    if lmo not in LMO_KINDS or score not in SCORE_KINDS:
        raise ValueError(f"unknown LMO {lmo!r} / score {score!r}")
    values = vscores if lmo == "layer" else vscores.sum(dim=1)
    if score == "inner_product":
        return values
    if vnorms is None:
        raise ValueError("cosine scores need the vertices' norms")
    norms = vnorms if lmo == "layer" else vnorms.pow(2).sum(dim=1).sqrt()
    return torch.where(norms > 0, values / norms.clamp(min=torch.finfo(norms.dtype).tiny), torch.zeros_like(values))


def ranked_points(rank: torch.Tensor, n_tensors: int, k: int) -> list[torch.Tensor]:
    """The k best LMO points, best first (ties go to the lower vertex index, so an
    all-zero column keeps the base)."""
    n_vertices = rank.shape[0]
    k = min(k, n_vertices)
    # a stable sort keeps the lower index first among equal scores
    order = torch.sort(rank, dim=0, stable=True).indices
    if rank.dim() == 1:
        return [order[j].repeat(n_tensors) for j in range(k)]
    return [order[j] for j in range(k)]


def one_hot(choice: torch.Tensor, n_vertices: int) -> torch.Tensor:
    out = torch.zeros(n_vertices, choice.shape[0], dtype=torch.float64)
    out[choice, torch.arange(choice.shape[0])] = 1.0
    return out


def candidate_coefficients(weights: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The coefficient of each task vector implied by the vertex weights (row 0 is the
    base); ``scale``: what one unit of weight is worth in the set (a scaled hull's radius)."""
    return weights[1:] * scale if scale != 1.0 else weights[1:].clone()
