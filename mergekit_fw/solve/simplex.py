"""Pure maths on the probability simplex: feasibility and Euclidean projection."""

from __future__ import annotations

import torch


class InfeasibleError(AssertionError):
    """An iterate left the constraint set (a bug, never user input)."""


def check_feasible(weights: torch.Tensor, atol: float = 1e-9) -> None:
    """Vertex weights per tensor (columns) must be >= 0 and sum to 1."""
    if weights.numel() == 0:
        return
    low = float(weights.min())
    if low < -atol:
        raise InfeasibleError(f"negative vertex weight {low}")
    sums = weights.sum(dim=0)
    worst = float((sums - 1).abs().max())
    if worst > atol:
        raise InfeasibleError(f"vertex weights sum to 1 +- {worst}")


def project_to_simplex(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Exact Euclidean projection of each slice along ``dim`` onto the simplex.

    Sort-based (Held et al.; Duchi et al. 2008): find the threshold ``tau`` with
    ``sum(max(v - tau, 0)) = 1`` and clip. O(k log k) per slice, no iteration.
    """
    v = values.movedim(dim, -1)
    k = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    cumsum = u.cumsum(dim=-1) - 1
    ranks = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    condition = u - cumsum / ranks > 0
    # the last index where the condition holds (it holds on a prefix)
    rho = (condition * ranks).argmax(dim=-1, keepdim=True)
    tau = cumsum.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - tau).clamp(min=0).movedim(-1, dim)
