"""LMO scores for LoRA candidates as gradients of scalar gates.

For the merged model ``W_l = W0_l + sum_i c[i, l] * s_i B_i A_i`` the score
``<dL/dW_l, s_i B_i A_i>`` equals ``dL/dc[i, l]``. So every adapter stays in
low-rank form on its module's path, scaled by a gate ``c[i, l]``, and one
backward pass to the gates yields the whole LoRA score table: no dense delta and
no dense gradient is ever formed, and memory grows only with the adapters' bytes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

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

    def without(self, rows: Collection[int]) -> _ModuleBank | None:
        """This bank without the adapters of gate rows ``rows`` (their rank slices cut
        out); None when none is left. The kept slices are copied, so a forward reads
        only the kept adapters."""
        here = self.rows.tolist()
        keep = [k for k, row in enumerate(here) if row not in rows]
        if len(keep) == len(here):
            return self
        if not keep:
            return None
        ends = torch.cumsum(self.ranks.cpu(), dim=0).tolist()
        slices = [torch.arange(end - int(self.ranks[k]), end) for k, end in enumerate(ends) if k in keep]
        index = torch.cat(slices).to(self.A.device)
        kept = torch.tensor(keep, dtype=torch.long, device=self.scale.device)
        return _ModuleBank(
            self.column,
            [here[k] for k in keep],
            self.A.index_select(0, index),
            self.B.index_select(1, index),
            self.scale.index_select(0, kept),
            self.ranks.index_select(0, kept),
        )


class LoraGates:
    """Forward hooks that add gated low-rank paths to the base model's linears."""

    def __init__(self, model: nn.Module, candidates: Sequence[tuple[int, LoraCandidate]], tensors: Sequence[str]):
        dtype = next(model.parameters()).dtype
        self.candidate_rows = [index for index, _ in candidates]
        self.tensors = list(tensors)
        self.gates = torch.zeros(len(candidates), len(self.tensors), dtype=torch.float64, device=input_device(model))
        self._handles = []
        # one bank per hooked module, every adapter in it; the hooks read ``_banks``, which
        # ``hold`` replaces with these banks less the held adapters (None: none left)
        self._full: list[_ModuleBank] = []
        self._banks: list[_ModuleBank | None] = []
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
            self._full.append(bank)
            self._banks.append(bank)
            self._handles.append(module.register_forward_hook(self._hook(len(self._banks) - 1)))

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

    def _hook(self, slot: int):
        def add_low_rank(module: nn.Module, inputs, output):
            bank = self._banks[slot]
            if bank is None:  # every adapter of this module is held at 0
                return output
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

    def hold(self, rows: Collection[int]) -> None:
        """Take the paths of gate rows ``rows`` (and only those) out of the model: held
        at 0, their products would add nothing but seconds; their scores, no longer
        computed, read 0. An empty ``rows`` puts every adapter back."""
        held = set(rows)
        self._banks = [bank.without(held) for bank in self._full]

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
