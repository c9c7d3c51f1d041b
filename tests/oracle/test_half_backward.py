"""Half-precision backward products through float32 on CPUs without native ones:
the same gradients as the linear layer's own, and the oracle's numbers kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mergekit_fw.oracle import half_backward
from mergekit_fw.oracle.half_backward import _Linear, matmul, route_linear_backward, slow_half_products
from tests.oracle.test_precision import _oracle, _point


@pytest.fixture
def slow_cpu(monkeypatch):
    """Route as on a CPU without native half products, whatever this one has."""
    monkeypatch.setattr(half_backward, "slow_half_products", lambda dtype, device: dtype in half_backward.HALF)


def test_only_half_precision_on_the_cpu_can_be_slow():
    assert not slow_half_products(torch.float32, torch.device("cpu"))
    assert not slow_half_products(torch.bfloat16, torch.device("meta"))
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert slow_half_products(torch.bfloat16, torch.device("cpu")) is (not native)


def test_the_routed_linear_is_the_linear_layers_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_Linear.apply, (x, weight, bias))
    assert torch.autograd.gradcheck(lambda a, w: _Linear.apply(a, w, None), (x, weight))


def test_bf16_products_through_float32_are_the_exact_product_rounded_once(slow_cpu):
    torch.manual_seed(0)
    a, b = torch.randn(16, 64).bfloat16(), torch.randn(64, 32).bfloat16()
    exact = a.double() @ b.double()
    product = matmul(a, b)
    assert product.dtype == torch.bfloat16
    # one rounding of a float32 sum: within half a bf16 ulp of the exact value (plus float32's error)
    assert torch.all((product.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5)


def test_only_cpu_half_linear_layers_are_routed(slow_cpu):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).bfloat16(), nn.Linear(4, 4).half())
    assert route_linear_backward(model) == 2
    assert "forward" not in vars(model[0]) and "forward" in vars(model[1]) and "forward" in vars(model[2])


@pytest.mark.parametrize("kinds", [("lora",), ("lora", "dense")], ids=["gates", "gates and dense gradients"])
def test_a_routed_bf16_oracle_scores_as_the_native_one(random_pool, slow_cpu, kinds, monkeypatch):
    """The same loss (the forward is untouched) and scores within bf16's rounding of
    the native products, through the LoRA gates and the dense weights' gradients."""
    routed, pool = _oracle(random_pool, kinds=kinds, oracle_dtype="bfloat16")
    linear = [m for m in routed.model.modules() if type(m) is nn.Linear]
    assert linear and all("forward" in vars(m) for m in linear)
    monkeypatch.setattr(half_backward, "slow_half_products", lambda dtype, device: False)
    native, _ = _oracle(random_pool, kinds=kinds, oracle_dtype="bfloat16")
    assert not any("forward" in vars(m) for m in native.model.modules())
    full, _ = _oracle(random_pool, kinds=kinds)
    point = _point(routed, pool)
    monkeypatch.setattr(half_backward, "slow_half_products", lambda dtype, device: dtype in half_backward.HALF)
    a = routed.evaluate(point)
    monkeypatch.setattr(half_backward, "slow_half_products", lambda dtype, device: False)
    b, reference = native.evaluate(point), full.evaluate(point)
    assert a.loss == b.loss
    # float32 products: at least as close to the float32 oracle's scores as native bf16's
    error_routed = float((a.scores - reference.scores).norm())
    error_native = float((b.scores - reference.scores).norm())
    assert error_routed <= 1.1 * error_native
    torch.testing.assert_close(a.scores, b.scores, rtol=0.05, atol=0.05 * float(b.scores.abs().max()))
