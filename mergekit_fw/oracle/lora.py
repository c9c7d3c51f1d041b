"""LMO scores for LoRA candidates as gradients of scalar gates.

For the merged model ``W_l = W0_l + sum_i c[i, l] * s_i B_i A_i`` the score
``<dL/dW_l, s_i B_i A_i>`` equals ``dL/dc[i, l]``. So every adapter stays in
low-rank form on its module's path, scaled by a gate ``c[i, l]``, and one
backward pass to the gates yields the whole LoRA score table: no dense delta and
no dense gradient is ever formed, and memory grows only with the adapters' bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mergekit_fw.oracle.half_backward import matmul
from mergekit_fw.pool.candidates import LoraCandidate


class _GatedLowRank(torch.autograd.Function):
    """``((x @ A.T) * g) @ B.T`` saving only ``x``, not the (tokens x total rank)
    product: the gates' backward recomputes it one module at a time, so what
    autograd keeps alive does not grow with the number of adapters."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, per_rank: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, per_rank, A, B)
        return ((x @ A.T) * per_rank.to(x.dtype)) @ B.T

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, per_rank, A, B = ctx.saved_tensors
        v = matmul(grad_out, B)  # (..., R)
        grad_per_rank = None
        if ctx.needs_input_grad[1]:
            u = x @ A.T
            grad_per_rank = (v.to(per_rank.dtype) * u.to(per_rank.dtype)).reshape(-1, u.shape[-1]).sum(dim=0)
        grad_x = matmul(v * per_rank.to(v.dtype), A) if ctx.needs_input_grad[0] else None
        return grad_x, grad_per_rank, None, None


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embeddings' device (Accelerate may spread the rest)."""
    return execution_device(model.get_input_embeddings())  # type: ignore[operator]  # a transformers model


def execution_device(module: nn.Module) -> torch.device:
    """The device a module computes on; an offloaded module (weights on ``meta``)
    computes where its Accelerate hook moves them."""
    weight = getattr(module, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


class _ModuleBank:
    """All adapters of one linear module, concatenated along the rank axis."""

    def __init__(
        self, column: int, rows: list[int], A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, ranks: torch.Tensor
    ):
        self.column = column  # this module's column in the gate table
        self.rows = torch.tensor(rows, dtype=torch.long)  # gate rows of its adapters
        self.A = A  # (R, in)
        self.B = B  # (out, R)
        self.scale = scale  # (n_here,)
        self.ranks = ranks  # (n_here,)


class LoraGates:
    """Forward hooks that add gated low-rank paths to the base model's linears."""

    def __init__(self, model: nn.Module, candidates: Sequence[tuple[int, LoraCandidate]], tensors: Sequence[str]):
        dtype = next(model.parameters()).dtype
        self.candidate_rows = [index for index, _ in candidates]
        self.tensors = list(tensors)
        self.gates = torch.zeros(len(candidates), len(self.tensors), dtype=torch.float64, device=input_device(model))
        self._handles = []
        modules = dict(model.named_modules())
        for column, tensor in enumerate(self.tensors):
            rows, here, scales, ranks = [], [], [], []
            for row, (_, candidate) in enumerate(candidates):
                factors = candidate.factors.get(tensor)
                if factors is None:
                    continue
                rows.append(row)
                here.append(factors)
                scales.append(factors.scale)
                ranks.append(factors.rank)
            if not rows:
                continue
            module_name = tensor[: -len(".weight")] if tensor.endswith(".weight") else None
            module = modules.get(module_name) if module_name else None
            if not isinstance(module, nn.Linear):
                raise ValueError(f"LoRA target {tensor}: no nn.Linear module {module_name!r} in the base model")
            device = execution_device(module)
            A, B = self._fill_bank(here, device, dtype)
            bank = _ModuleBank(
                column,
                rows,
                A,
                B,
                torch.tensor(scales, dtype=torch.float64, device=device),
                torch.tensor(ranks, dtype=torch.long, device=device),
            )
            self._handles.append(module.register_forward_hook(self._hook(bank)))

    @staticmethod
    def _fill_bank(factors, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One module's adapters side by side along the rank axis, filled adapter by
        adapter; where the bank has the factors' own dtype and device they then
        point at its slices, so every adapter is resident once."""
        total = sum(f.rank for f in factors)
        out_features, in_features = factors[0].shape
        A = torch.empty(total, in_features, dtype=dtype, device=device)
        B = torch.empty(out_features, total, dtype=dtype, device=device)
        offset = 0
        for f in factors:
            A[offset : offset + f.rank].copy_(f.A)
            B[:, offset : offset + f.rank].copy_(f.B)
            if dtype == torch.float32 and A.device.type == "cpu":
                f.share(A[offset : offset + f.rank], B[:, offset : offset + f.rank])
            else:
                f.release()
            offset += f.rank
        return A, B

    def _hook(self, bank: _ModuleBank):
        def add_low_rank(module: nn.Module, inputs, output):
            x = inputs[0]
            gates = self.gates[bank.rows, bank.column].to(bank.scale.device)
            # at least float32: the gates' gradients are the LMO scores, summed over every token
            per_rank = torch.repeat_interleave(gates * bank.scale, bank.ranks).to(
                torch.promote_types(x.dtype, torch.float32)
            )
            return output + _GatedLowRank.apply(x, per_rank, bank.A, bank.B)

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
