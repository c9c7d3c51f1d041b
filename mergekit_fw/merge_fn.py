"""How a coefficient table becomes one tensor: the merge function.

Shared by the oracle (the model it differentiates), the fast-path writer and the
mergekit kernel, so all three compute the same model from the same table.

* ``convex``: ``base + sum_i c_i * delta_i`` (stays in the convex hull).
* ``ties``: mergekit's own ``ties`` with the coefficients as weights; may leave
  the hull. This layer does not import mergekit: the kernel is handed in by
  :mod:`mergekit_fw.integration.stock` as a :data:`TiesKernel`.

Under ``convex``, a tensor whose whole weight sits on one stored vertex is that
vertex's tensor, bit for bit: ``base + 1.0 * (theta - base)`` is not always
``theta`` in floating point, and a run that starts from another merge must
reproduce it exactly. (Under ``ties`` a lone vertex is still trimmed.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (name, base, deltas, weights) -> merged tensor; only non-zero weights are passed
MergeFunction = Callable[[str, torch.Tensor, list[torch.Tensor], list[float]], torch.Tensor]
# density -> mergekit's TIES as a MergeFunction
TiesKernel = Callable[[float], MergeFunction]


def convex_merge(name: str, base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    acc = base.clone()
    for delta, weight in zip(deltas, weights):
        acc.add_(delta, alpha=weight)
    return acc


def merge_function(merge_fn: str, density: float | None = None, ties: TiesKernel | None = None) -> MergeFunction:
    """``ties`` is mergekit's kernel, needed only for ``merge_fn: ties``."""
    if merge_fn == "convex":
        return convex_merge
    if merge_fn == "ties":
        if ties is None:
            raise ValueError(
                "merge_fn 'ties' is mergekit's own kernel: pass ties=mergekit_fw.integration.stock.ties_merge_function"
            )
        return ties(1.0 if density is None else density)
    raise ValueError(f"unknown merge_fn {merge_fn!r}")


def single_vertex(weights: list[float]) -> int | None:
    """The index of the only non-zero weight when it is exactly 1, else None."""
    nonzero = [i for i, w in enumerate(weights) if w != 0.0]
    if len(nonzero) == 1 and weights[nonzero[0]] == 1.0:
        return nonzero[0]
    return None


def compute_dtype(base: torch.Tensor) -> torch.dtype:
    return torch.float64 if base.dtype == torch.float64 else torch.float32
