"""The oracle's scale options: gradient checkpointing, a bf16 base, Accelerate
placement and data parallel shards give the numbers of the plain float oracle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mergekit_fw.calibration.batches import build_calibration
from mergekit_fw.config import FrankWolfeParameters
from mergekit_fw.distributed import Processes
from mergekit_fw.oracle import Oracle
from mergekit_fw.pool.pool import open_pool
from mergekit_fw.solve.runner import load_base_model
from tests.oracle.helpers import pool_spec


def _oracle(random_pool, processes=None, kinds=("lora", "dense"), **settings):
    spec = pool_spec(random_pool, kinds=kinds)
    pool = open_pool(spec)
    params = FrankWolfeParameters(calibration=str(random_pool["calibration"]), **settings)
    model, _ = load_base_model(pool, params, Processes())
    tokenizer = AutoTokenizer.from_pretrained(str(random_pool["base"]))
    calibration = build_calibration(random_pool["calibration"], tokenizer, samples_per_task=100, batch_size=2, max_length=64)
    return Oracle(model, pool, calibration, processes=processes), pool


def _point(oracle, pool, seed=3):
    torch.manual_seed(seed)
    return torch.rand(len(pool.candidates), len(oracle.tensors), dtype=torch.float64) * 0.4


def test_gradient_checkpointing_recomputes_layers_and_changes_no_number(random_pool):
    plain, pool = _oracle(random_pool)
    checkpointed, _ = _oracle(random_pool, gradient_checkpointing=True)
    calls = []
    layer = checkpointed.model.model.layers[0]
    handle = layer.input_layernorm.register_forward_pre_hook(lambda *args: calls.append(1))
    point = _point(plain, pool)
    reference = plain.evaluate(point, per_task=True)
    evaluation = checkpointed.evaluate(point, per_task=True)
    handle.remove()
    # checkpointing is really on: every batch's layer ran again in the backward pass
    assert len(calls) == 2 * len(checkpointed.batches)
    assert abs(evaluation.loss - reference.loss) < 1e-6
    torch.testing.assert_close(evaluation.scores, reference.scores, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(evaluation.task_scores, reference.task_scores, rtol=1e-5, atol=1e-8)
    assert abs(checkpointed.loss(point) - reference.loss) < 1e-6  # the no-grad path works too


def test_bf16_base_gives_close_loss_and_scores(random_pool):
    full, pool = _oracle(random_pool)
    half, _ = _oracle(random_pool, oracle_dtype="bfloat16", gradient_checkpointing=True)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    point = _point(full, pool)
    reference, evaluation = full.evaluate(point), half.evaluate(point)
    assert abs(evaluation.loss - reference.loss) < 0.02 * abs(reference.loss)
    a, b = evaluation.scores.flatten(), reference.scores.flatten()
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.98
    # the layer-wise LMO picks the same vertex on most tensors
    agree = (evaluation.scores.argmin(dim=0) == reference.scores.argmin(dim=0)).float().mean()
    assert float(agree) >= 0.8


def test_accelerate_placement_and_offload_give_the_same_numbers(random_pool):
    """'auto' placement loads; a model Accelerate offloads (weights on 'meta',
    moved in by hooks, as for models bigger than the device) scores the same."""
    from accelerate import cpu_offload

    plain, pool = _oracle(random_pool)
    placed, _ = _oracle(random_pool, device_map="auto")
    point = _point(plain, pool)
    reference, evaluation = plain.evaluate(point), placed.evaluate(point)
    assert abs(evaluation.loss - reference.loss) < 1e-6
    torch.testing.assert_close(evaluation.scores, reference.scores, rtol=1e-5, atol=1e-8)

    lora_only, lora_pool = _oracle(random_pool, kinds=("lora",))
    model = lora_only.model
    lora_only.close()
    offloaded = cpu_offload(model, execution_device=torch.device("cpu"))
    assert offloaded.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    oracle = Oracle(offloaded, lora_pool, lora_only.calibration)
    point = _point(oracle, lora_pool)
    reference = _oracle(random_pool, kinds=("lora",))[0].evaluate(point)
    evaluation = oracle.evaluate(point)
    assert abs(evaluation.loss - reference.loss) < 1e-6
    torch.testing.assert_close(evaluation.scores, reference.scores, rtol=1e-5, atol=1e-8)


@dataclass(frozen=True)
class _LoneShard(Processes):
    """One rank of a data parallel run, without the others: its sums stay local."""

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def test_data_parallel_shards_add_up_to_the_whole(random_pool):
    whole, pool = _oracle(random_pool)
    shards = [_oracle(random_pool, processes=_LoneShard(rank=r, world_size=3))[0] for r in range(3)]
    assert sorted(len(s.batches) for s in shards) != [0, 0, len(whole.batches)]  # really split
    assert sum(len(s.batches) for s in shards) == len(whole.batches)
    point = _point(whole, pool)
    reference = whole.evaluate(point, per_task=True)
    parts = [s.evaluate(point, per_task=True) for s in shards]
    assert abs(sum(p.loss for p in parts) - reference.loss) < 1e-6
    torch.testing.assert_close(sum(p.scores for p in parts), reference.scores, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(sum(p.task_scores for p in parts), reference.task_scores, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(sum(p.task_losses for p in parts), reference.task_losses, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("oracle_dtype", "config_dtype", "expected"),
    [("auto", "bfloat16", "bfloat16"), ("auto", "float16", "float16"), ("auto", None, "float32"),
     ("auto", "float32", "float32"), ("float32", "bfloat16", "float32"), ("bfloat16", None, "bfloat16")],
)
def test_auto_oracle_dtype_follows_the_configs_dtype(random_pool, tmp_path, oracle_dtype, config_dtype, expected):
    from mergekit_fw.integration.configs import load_merge_config, pool_and_parameters
    from tests.paths import write_config

    config = {"merge_method": "frank_wolfe", "base_model": str(random_pool["base"]),
              "models": [{"model": f"{random_pool['base']}+{random_pool['adapters'][0]}"}],
              "parameters": {"calibration": str(random_pool["calibration"]), "oracle_dtype": oracle_dtype}}
    if config_dtype is not None:
        config["dtype"] = config_dtype
    spec, params = pool_and_parameters(load_merge_config(write_config(tmp_path / "fw.yml", config)))
    assert params.oracle_dtype_for(spec.dtype) == expected
    model, _ = load_base_model(open_pool(spec), params, Processes(), spec.dtype)
    assert next(model.parameters()).dtype == getattr(torch, expected)


def test_the_oracles_model_is_released_before_the_write(random_pool, tmp_path, monkeypatch):
    """Peak memory is the larger of solve and write, not their sum: once the solve
    returns, nothing holds the oracle's model. (Checked by breaking it: a reference
    kept past the solve fails this; the explicit del in the runner alone is not what
    it tests, the local would die on return anyway.)"""
    import weakref

    from mergekit_fw.solve import runner

    models = []

    def loading(*args, **kwargs):
        model, tokenizer = load_base_model(*args, **kwargs)
        models.append(weakref.ref(model))
        return model, tokenizer

    monkeypatch.setattr(runner, "load_base_model", loading)
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    result = runner.solve_cached(pool_spec(random_pool, kinds=("lora",)),
                                 FrankWolfeParameters(calibration=str(random_pool["calibration"]), iterations=2),
                                 progress=False)
    assert len(result.trace.iterations) >= 1 and len(models) == 1
    assert models[0]() is None


@pytest.mark.slow
def test_a_bf16_oracle_takes_the_float32_decisions_on_the_testbed(testbed, tmp_path, monkeypatch):
    """Measured on the small trained pool (README): the same picks for the first
    iterations, then near-ties go either way; the same stop, loss and coefficients.
    bf16 products round differently with and without AVX-512 BF16: with it every
    pick of the first three iterations agreed, without it 13 of 14 at the third.
    The losses are both tables' merges scored by one float32 oracle. Without the screen:
    these figures were measured before it existed (the screened solve: the next test)."""
    params, full, half = _solve_both(testbed, tmp_path, monkeypatch, iterations=30, screen_per_task=0)
    assert abs(len(full.trace.iterations) - len(half.trace.iterations)) <= 3
    _assert_the_same_decisions(params, full, half)


@pytest.mark.slow
def test_a_bf16_oracle_screens_the_same_members_and_follows_float32s_path(testbed, tmp_path, monkeypatch):
    """The screen (on by default) is decided on the first gradient's per-task scores, so
    a bf16 oracle could keep other members: on the testbed it keeps the same 4 of 6. Over
    a fixed 12 iterations the merges are 0.3% apart (Xeon with AVX-512 BF16, 2026-12-06).
    Where each stops on the relative gap is not compared here: the gap is not monotone,
    and the bf16 solve stopped at 14 iterations against float32's 17 (README)."""
    params, full, half = _solve_both(testbed, tmp_path, monkeypatch, iterations=12, epsilon_relative=0.0)
    assert full.trace.screen is not None and full.trace.screen["dropped"]
    assert half.trace.screen == full.trace.screen
    assert len(full.trace.iterations) == len(half.trace.iterations) == 12
    _assert_the_same_decisions(params, full, half)


def _solve_both(testbed, tmp_path, monkeypatch, **update):
    from mergekit_fw.integration.configs import load_merge_config, pool_and_parameters
    from mergekit_fw.integration.stock import solve

    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    spec, params = pool_and_parameters(load_merge_config(testbed.root / "fw.yml"))
    full, half = (solve(spec, params.model_copy(update={"oracle_dtype": d, **update}), progress=False)
                  for d in ("float32", "bfloat16"))
    assert full.table.fingerprint != half.table.fingerprint  # two solves, not one reused
    return params, full, half


def _assert_the_same_decisions(params, full, half) -> None:
    """The same picks for two iterations and all but one at the third; the merge each
    table makes, scored by one float32 oracle (bf16's own loss estimate is bf16's),
    within 2%; the coefficients close."""
    for a, b in zip(full.trace.iterations[:2], half.trace.iterations[:2]):
        assert a.choice == b.choice
    third = zip(full.trace.iterations[2].choice, half.trace.iterations[2].choice, strict=True)
    assert sum(x != y for x, y in third) <= 1
    model, tokenizer = load_base_model(full.pool, params.model_copy(update={"oracle_dtype": "float32"}), Processes())
    calibration = build_calibration(
        Path(params.calibration), tokenizer, samples_per_task=params.samples_per_task, batch_size=params.batch_size,
        max_length=params.max_length, objective=params.objective)
    oracle = Oracle(model, full.pool, calibration)
    try:
        reference, merged = (oracle.loss(r.table.coefficients()) for r in (full, half))
    finally:
        oracle.close()
    assert abs(reference - full.trace.final_loss) <= 1e-6 * reference
    assert abs(merged - reference) <= 0.02 * reference, (merged, reference, half.trace.final_loss)
    difference = (full.table.coefficients() - half.table.coefficients()).abs()
    assert float(difference.mean()) < 0.03 and float(difference.max()) < 0.2
