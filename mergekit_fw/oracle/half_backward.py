"""Half-precision gradients on CPUs without native half-precision matrix products.

A linear layer's backward multiplies ``grad @ W`` with ``W`` in its stored
(out, in) layout. On a CPU without AVX-512 BF16 / FP16 units, torch's CPU build
sends that layout to a reference gemm. Measured on an AMD EPYC (AVX2 only,
torch 2.13, 2 threads): ``(128 x 11008) @ (11008 x 4096)`` in bfloat16 took 42 s
in a linear layer's backward, against 0.18 s in float32. The forward's layout
stays fast (0.8 s). One oracle pass of a 7B-shaped, 2-layer model took over six
minutes, all of it there. So on such a CPU the oracle keeps its weights,
activations and forward in half precision, and computes only the backward's
products in float32. Each product upcasts one weight, transiently (the largest, a
32000 x 4096 head, is 0.5 GB), and is the float32 product rounded once to half
precision (a test holds that).
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn
from torch.nn import functional as F

LOG = logging.getLogger(__name__)

HALF = (torch.bfloat16, torch.float16)


def slow_half_products(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether half-precision products on this device take torch's reference gemm."""
    if dtype not in HALF or device.type != "cpu":
        return False
    mkldnn = torch.ops.mkldnn
    native = mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else mkldnn._is_mkldnn_fp16_supported()
    return not native


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in ``a``'s dtype, through float32 where half products are slow."""
    if slow_half_products(a.dtype, a.device):
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b


class _Linear(torch.autograd.Function):
    """``F.linear`` whose backward products go through :func:`matmul`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = matmul(grad_out, weight) if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:  # the dense path's gradient on a moved weight
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
            grad_weight = matmul(flat_grad.t(), x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0)
        return grad_x, grad_weight, grad_bias


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _Linear.apply(x, self.weight, self.bias)


def route_linear_backward(model: nn.Module) -> int:
    """Give every CPU-resident half-precision ``nn.Linear`` the float32 backward
    where half products are slow; returns how many were given it. Modules under an
    Accelerate hook (offloaded, or on another device) keep theirs: the hook owns
    their ``forward``."""
    routed = 0
    for module in model.modules():
        if type(module) is not nn.Linear or hasattr(module, "_hf_hook"):
            continue
        if slow_half_products(module.weight.dtype, module.weight.device):
            module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]
            routed += 1
    if routed:
        LOG.info(
            "this CPU has no native half-precision products: %d linear layers take their backward in float32", routed
        )
    return routed
