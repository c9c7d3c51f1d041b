"""The oracle's scale options: gradient checkpointing, a bf16 base, Accelerate
placement and data parallel shards give the numbers of the plain float oracle."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from mergekit_fw.calibration import build_calibration
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
