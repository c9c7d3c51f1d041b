"""LMO scores for full-checkpoint candidates: one dense gradient, streamed deltas.

The model's weights hold the dense part of the current iterate
``W0 + sum_j c[j, l] * (theta_j - W0)``. After one backward pass the gradient of
every moved tensor is on its parameter; each candidate's tensor is then read from
its safetensors file one at a time and dotted with it, so resident memory does not
grow with the number of candidates.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from mergekit_fw.pool import DenseCandidate


class DenseMix:
    def __init__(self, model: nn.Module, candidates: Sequence[Tuple[int, DenseCandidate]], tensors: Sequence[str]):
        self.candidates = list(candidates)
        self.tensors = list(tensors)
        touched = set()
        for _, candidate in self.candidates:
            touched.update(candidate.touched)
        self.columns = [c for c, name in enumerate(self.tensors) if name in touched]
        params = dict(model.named_parameters())
        self.params: Dict[str, nn.Parameter] = {}
        for column in self.columns:
            name = self.tensors[column]
            if name not in params:
                raise ValueError(f"dense candidate tensor {name!r} is not a parameter of the loaded base model")
            self.params[name] = params[name]
        # W0 of the moved tensors: the dense iterate is rebuilt from it.
        self.base = {name: p.detach().clone() for name, p in self.params.items()}

    def set(self, coefficients: torch.Tensor) -> None:
        """Write ``W0 + sum_j c[j, l] delta_j`` into the model, one tensor at a time."""
        with torch.no_grad():
            for column in self.columns:
                name = self.tensors[column]
                base = self.base[name]
                acc = base.to(torch.float64 if base.dtype == torch.float64 else torch.float32).clone()
                for row, candidate in self.candidates:
                    weight = float(coefficients[row, column])
                    if weight != 0.0 and name in candidate.index.files:
                        acc.add_(candidate.delta(name, base), alpha=weight)
                self.params[name].copy_(acc.to(base.dtype))

    def require_grad(self, flag: bool) -> None:
        for p in self.params.values():
            p.requires_grad_(flag)
            if not flag:
                p.grad = None

    def scores(self) -> torch.Tensor:
        """<grad_l, theta_j[l] - W0[l]> for every dense candidate j and tensor l."""
        out = torch.zeros(len(self.candidates), len(self.tensors), dtype=torch.float64)
        for column in self.columns:
            name = self.tensors[column]
            grad = self.params[name].grad
            if grad is None:
                continue
            grad = grad.to(torch.float64)
            for k, (_, candidate) in enumerate(self.candidates):
                if name in candidate.index.files:
                    delta = candidate.delta(name, self.base[name]).to(torch.float64)
                    out[k, column] = torch.sum(grad * delta)
        return out
