"""LMO scores for LoRA candidates as gradients of scalar gates.

For the merged model ``W_l = W0_l + sum_i c[i, l] * s_i B_i A_i`` the score
``<dL/dW_l, s_i B_i A_i>`` equals ``dL/dc[i, l]``. So every adapter stays in
low-rank form on its module's path, scaled by a gate ``c[i, l]``, and one
backward pass to the gates yields the whole LoRA score table: no dense delta and
no dense gradient is ever formed, and memory grows only with the adapters' bytes.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from mergekit_fw.pool import LoraCandidate


class _ModuleBank:
    """All adapters of one linear module, concatenated along the rank axis."""

    def __init__(self, column: int, rows: List[int], A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, ranks: torch.Tensor):
        self.column = column  # this module's column in the gate table
        self.rows = torch.tensor(rows, dtype=torch.long)  # gate rows of its adapters
        self.A = A  # (R, in)
        self.B = B  # (out, R)
        self.scale = scale  # (n_here,)
        self.ranks = ranks  # (n_here,)


class LoraGates:
    """Forward hooks that add gated low-rank paths to the base model's linears."""

    def __init__(self, model: nn.Module, candidates: Sequence[Tuple[int, LoraCandidate]], tensors: Sequence[str]):
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.candidate_rows = [index for index, _ in candidates]
        self.tensors = list(tensors)
        self.gates = torch.zeros(len(candidates), len(self.tensors), dtype=torch.float64, device=device)
        self._handles = []
        modules = dict(model.named_modules())
        for column, tensor in enumerate(self.tensors):
            rows, As, Bs, scales, ranks = [], [], [], [], []
            for row, (_, candidate) in enumerate(candidates):
                factors = candidate.factors.get(tensor)
                if factors is None:
                    continue
                rows.append(row)
                As.append(factors.A)
                Bs.append(factors.B)
                scales.append(factors.scale)
                ranks.append(factors.A.shape[0])
            if not rows:
                continue
            module_name = tensor[: -len(".weight")] if tensor.endswith(".weight") else None
            module = modules.get(module_name) if module_name else None
            if not isinstance(module, nn.Linear):
                raise ValueError(f"LoRA target {tensor}: no nn.Linear module {module_name!r} in the base model")
            bank = _ModuleBank(
                column,
                rows,
                torch.cat(As, 0).to(device=device, dtype=dtype),
                torch.cat(Bs, 1).to(device=device, dtype=dtype),
                torch.tensor(scales, dtype=torch.float64, device=device),
                torch.tensor(ranks, dtype=torch.long, device=device),
            )
            self._handles.append(module.register_forward_hook(self._hook(bank)))

    def _hook(self, bank: _ModuleBank):
        def add_low_rank(module: nn.Module, inputs, output):
            x = inputs[0]
            per_adapter = self.gates[bank.rows, bank.column] * bank.scale
            per_rank = torch.repeat_interleave(per_adapter, bank.ranks).to(x.dtype)
            return output + ((x @ bank.A.T) * per_rank) @ bank.B.T

        return add_low_rank

    def set(self, coefficients: torch.Tensor, columns: Sequence[int]) -> None:
        """Gates from the candidate-coefficient table (rows: all candidates)."""
        with torch.no_grad():
            values = coefficients[self.candidate_rows][:, list(columns)]
            self.gates = values.to(self.gates.device, torch.float64).clone()

    def require_grad(self, flag: bool) -> None:
        self.gates.requires_grad_(flag)

    def scores(self) -> torch.Tensor:
        """d loss / d gate, (n_lora, n_tensors); zero where an adapter has no path."""
        grad = self.gates.grad
        return torch.zeros_like(self.gates) if grad is None else grad.detach().clone()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
