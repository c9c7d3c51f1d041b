"""LMO scores through the model's dense weights: one dense gradient, streamed deltas.

Used for full-checkpoint candidates, and for every candidate when the merge
function is not a plain weighted sum (``ties``). The model's weights hold the
dense part of the current iterate, ``MergeFn(W0, {delta_j}, {c[j, l]})`` per
tensor, rebuilt one tensor (and one block of its rows) at a time. After one
backward pass the gradient of every moved tensor is on its parameter; each
candidate's delta is then produced a block of rows at a time (read from
safetensors, or a LoRA's low-rank product) and dotted with it, so resident
memory grows neither with the number of candidates nor with a tensor's size.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import ExitStack

import torch
from torch import nn

from mergekit_fw.merge_fn import MergeFunction, compute_dtype, convex_merge
from mergekit_fw.pool.candidates import Candidate
from mergekit_fw.pool.rows import delta_rows, row_blocks, tensor_rows


class DenseMix:
    def __init__(
        self,
        model: nn.Module,
        candidates: Sequence[tuple[int, Candidate]],
        tensors: Sequence[str],
        merge: MergeFunction | None = None,
    ):
        self.candidates = list(candidates)
        self.tensors = list(tensors)
        self.merge = merge or convex_merge
        # Under a plain weighted sum LoRA factors go through the gates and only full
        # tensors (checkpoints, an adapter's modules_to_save) come here; TIES takes all.
        self._touches = [
            set(candidate.dense_tensor_names() if self.merge is convex_merge else candidate.tensor_names())
            for _, candidate in self.candidates
        ]
        touched = set().union(*self._touches) if self._touches else set()
        self.columns = [c for c, name in enumerate(self.tensors) if name in touched]
        params = dict(model.named_parameters())
        self.params: dict[str, nn.Parameter] = {}
        for column in self.columns:
            name = self.tensors[column]
            if name not in params:
                raise ValueError(f"candidate tensor {name!r} is not a parameter of the loaded base model")
            if params[name].device.type == "meta":
                raise ValueError(
                    f"candidate tensor {name!r} is offloaded by device_map; full-checkpoint candidates "
                    "need every tensor they change on a device (give the oracle more memory or use LoRAs)"
                )
            self.params[name] = params[name]
        # W0 of the moved tensors, kept on the CPU beside the streamed deltas: the
        # dense iterate is rebuilt from it and copied onto the model's device.
        self.base = {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()}
        self._held: set[int] = set()  # positions in ``candidates`` held at 0: not scored

    def hold(self, rows: Collection[int]) -> None:
        """Score no candidate of pool rows ``rows`` (held at 0), and every other: each
        score streams the candidate's every delta from disk, a full checkpoint's whole
        size per gradient."""
        self._held = {k for k, (row, _) in enumerate(self.candidates) if row in rows}

    def set(self, coefficients: torch.Tensor) -> None:
        """Write ``MergeFn(W0, deltas, c[:, l])`` into the model, one tensor at a time
        (under ``convex`` a block of rows at a time: no whole float32 copy of an
        embedding-sized base or delta)."""
        with torch.no_grad():
            for column in self.columns:
                name = self.tensors[column]
                base = self.base[name]
                present = [
                    (candidate, float(coefficients[row, column]))
                    for k, (row, candidate) in enumerate(self.candidates)
                    if name in self._touches[k] and float(coefficients[row, column]) != 0.0
                ]
                if self.merge is convex_merge and base.dim() > 0:
                    self._set_rows(name, base, present)
                    continue
                dtype = compute_dtype(base)
                deltas = []
                for candidate, _ in present:
                    delta = candidate.delta(name, base)
                    assert delta is not None  # every candidate here touches this tensor
                    deltas.append(delta.to(dtype))
                merged = self.merge(name, base.to(dtype), deltas, [w for _, w in present]) if deltas else base
                self.params[name].copy_(merged.to(base.dtype))

    def _set_rows(self, name: str, base: torch.Tensor, present: list[tuple[Candidate, float]]) -> None:
        """``convex_merge`` row block by row block: the same additions in the same
        order, so the same values as the whole-tensor merge."""
        dtype = compute_dtype(base)
        param = self.params[name]
        with ExitStack() as stack:
            deltas = [
                (stack.enter_context(delta_rows(candidate, name, tensor_rows(base), dtype)), weight)
                for candidate, weight in present
            ]
            for start, stop in row_blocks(base.shape):
                block = base[start:stop].to(dtype, copy=True)
                for rows, weight in deltas:
                    block.add_(rows(start, stop), alpha=weight)
                param[start:stop].copy_(block.to(base.dtype))

    def require_grad(self, flag: bool) -> None:
        for p in self.params.values():
            p.requires_grad_(flag)
            if not flag:
                p.grad = None

    def clear_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def scores(self) -> torch.Tensor:
        """<grad_l, delta_j[l]> for every candidate j here and tensor l, a block of
        rows at a time."""
        out = torch.zeros(len(self.candidates), len(self.tensors), dtype=torch.float64)
        for column in self.columns:
            name = self.tensors[column]
            grad = self.params[name].grad
            if grad is None:
                continue
            base = self.base[name]
            for k, (_, candidate) in enumerate(self.candidates):
                if name not in self._touches[k] or k in self._held:
                    continue
                if base.dim() == 0:
                    delta = candidate.delta(name, base)
                    assert delta is not None  # the candidate touches this tensor
                    out[k, column] = dot64(grad, delta)
                    continue
                with delta_rows(candidate, name, tensor_rows(base), compute_dtype(base)) as deltas:
                    out[k, column] = sum(
                        (dot64(grad[start:stop], deltas(start, stop)) for start, stop in row_blocks(base.shape)),
                        torch.zeros((), dtype=torch.float64),
                    )
        return out


DOT_BLOCK = 1 << 22


def dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b)`` accumulated in float64 on the CPU, a block at a time: whole
    float64 copies of an embedding-sized gradient and delta (and their product)
    would be 3 GB for a 7B's ``lm_head``, more than the rest of the oracle."""
    a, b = a.reshape(-1), b.reshape(-1)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, a.numel(), DOT_BLOCK):
        block = slice(start, start + DOT_BLOCK)
        total += torch.sum(a[block].to("cpu", torch.float64) * b[block].to("cpu", torch.float64))
    return total
