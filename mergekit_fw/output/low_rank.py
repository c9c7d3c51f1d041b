"""A sum of LoRA deltas as one low-rank pair, exact or truncated.

``sum_i c_i s_i B_i A_i`` is ``[c_1 s_1 B_1 | ... | c_n s_n B_n] @ [A_1; ...; A_n]``:
exact at rank ``sum_i r_i``. Its best rank-R approximation (Eckart-Young) comes from
the SVD of the product, which never needs the dense delta: with ``B = Q_B R_B`` and
``A^T = Q_A R_A``, ``B A = Q_B (R_B R_A^T) Q_A^T`` and only the small core is
decomposed.
"""

from __future__ import annotations

import torch


def stacked(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(B_i, A_i, weight_i)]`` (each weight with the adapter's scale folded in) to
    the stacked ``B`` (out x sum r) and ``A`` (sum r x in), in float64."""
    B = torch.cat([b.to(torch.float64) * weight for b, _, weight in factors], dim=1)
    A = torch.cat([a.to(torch.float64) for _, a, _ in factors], dim=0)
    return B, A


def truncated(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` pair for ``B @ A`` and its relative error in the
    Frobenius norm, ``||BA - B'A'|| / ||BA||`` (0 for a zero product). At or above
    the product's rank the pair is the exact one, re-factored."""
    Q_B, R_B = torch.linalg.qr(B.to(torch.float64))
    Q_A, R_A = torch.linalg.qr(A.to(torch.float64).T)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T)
    keep = min(rank, S.numel())
    total = float(S.square().sum())
    error = (float(S[keep:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    B_kept = (Q_B @ U[:, :keep]) * S[:keep]
    A_kept = Vh[:keep] @ Q_A.T
    return B_kept, A_kept, error
