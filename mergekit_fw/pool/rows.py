"""Full tensors and candidates' deltas, a block of rows at a time.

A 7B's ``lm_head`` or embedding is 32000 x 4096: one float32 copy of a
candidate's value is 0.5 GB, and its delta needs the value, the base and their
difference (a float64 norm doubles that again). Validation's norms, the dense
oracle's merge and scores, and the writer read full tensors only through these
readers, a few MiB of rows at a time, so the memory they add does not depend on
the tensor's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from mergekit_fw.pool.vocab import align_rows

if TYPE_CHECKING:
    from mergekit_fw.pool.candidates import Candidate, SafetensorsIndex

RowReader = Callable[[int, int], torch.Tensor]
"""``rows(start, stop)``: rows ``start:stop`` of one tensor (along its first axis)."""

BLOCK_ELEMENTS = 1 << 22  # 16 MiB of float32 per block: cache-friendly, no page-fault churn


def row_blocks(shape: tuple[int, ...] | torch.Size) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive row blocks of about :data:`BLOCK_ELEMENTS`
    elements covering a tensor of ``shape`` (at least one dimension)."""
    width = 1
    for size in shape[1:]:
        width *= size
    step = max(1, BLOCK_ELEMENTS // max(width, 1))
    for start in range(0, shape[0], step):
        yield start, min(start + step, shape[0])


def tensor_rows(tensor: torch.Tensor) -> RowReader:
    """A reader over a tensor already in memory (views, no copies)."""
    return lambda start, stop: tensor[start:stop]


@contextmanager
def stored_rows(index: SafetensorsIndex, name: str) -> Iterator[RowReader]:
    """Rows of a checkpoint's stored tensor, read without loading the rest."""
    path, key = index.where(name)
    with safe_open(str(path), framework="pt") as handle:
        stored = handle.get_slice(key)
        yield lambda start, stop: stored[start:stop]


@contextmanager
def value_rows(candidate: Candidate, name: str, base_rows: RowReader) -> Iterator[RowReader]:
    """Rows of a candidate's full value of ``name`` (a checkpoint's tensor or an
    adapter's ``modules_to_save``), in the base's row order. A tensor aligned to the
    base's vocabulary is read whole once: its rows are gathered by token, and a base
    token it lacks takes the base's row."""
    path, key = candidate.source_of(name)
    index = candidate.vocab_maps.get(name)
    if index is not None:
        with safe_open(str(path), framework="pt") as handle:
            value = handle.get_tensor(key)
        yield lambda start, stop: align_rows(value, index[start:stop], base_rows(start, stop))
        return
    with safe_open(str(path), framework="pt") as handle:
        stored = handle.get_slice(key)
        yield lambda start, stop: stored[start:stop]


@contextmanager
def delta_rows(candidate: Candidate, name: str, base_rows: RowReader, dtype: torch.dtype) -> Iterator[RowReader]:
    """Rows of ``candidate``'s task vector on ``name`` in ``dtype``: a LoRA's
    ``scale * B[rows] @ A`` (the dense oracle's scores under ``merge_fn: ties``, where
    every tensor takes the dense path), or the stored value's rows minus the base's."""
    if candidate.is_low_rank(name):
        factors = candidate.factors[name]  # type: ignore[union-attr]  # only LoRAs are low-rank
        A = factors.A.to(dtype)
        B = factors.B
        yield lambda start, stop: (B[start:stop].to(dtype) @ A) * factors.scale
        return
    with value_rows(candidate, name, base_rows) as values:
        yield lambda start, stop: values(start, stop).to(dtype) - base_rows(start, stop).to(dtype)


def delta_norm(candidate: Candidate, name: str, base: SafetensorsIndex) -> float:
    """``||delta||_F`` of one candidate tensor, summed in float64 a block of rows at
    a time (a LoRA's from its factors' Gram matrices); NaN/Inf anywhere propagate."""
    if candidate.is_low_rank(name):
        return candidate.factors[name].frobenius_norm()  # type: ignore[union-attr]
    shape = base.shape(name)
    if not shape:
        value = candidate.delta(name, base.get(name))
        return 0.0 if value is None else float(torch.linalg.vector_norm(value.to(torch.float64)))
    squares = torch.zeros((), dtype=torch.float64)
    with stored_rows(base, name) as base_rows, delta_rows(candidate, name, base_rows, torch.float64) as deltas:
        for start, stop in row_blocks(shape):
            squares += torch.sum(torch.square(deltas(start, stop)))
    return float(squares.sqrt())
