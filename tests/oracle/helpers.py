"""Brute-force references for the oracle tests: dense merged weights and autograd."""

from __future__ import annotations

from typing import Dict, List

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_fw.calibration.batches import build_calibration
from mergekit_fw.integration.stock import ties_merge_function
from mergekit_fw.merge_fn import merge_function
from mergekit_fw.objective import batch_loss, position_weights
from mergekit_fw.oracle import Oracle
from mergekit_fw.pool.pool import open_pool
from mergekit_fw.pool.references import CandidateSpec, ModelSource, PoolSpec


def pool_spec(random_pool, kinds=("lora", "dense")) -> PoolSpec:
    base = ModelSource(str(random_pool["base"]))
    candidates = []
    if "lora" in kinds:
        candidates += [CandidateSpec(f"lora{i}", base, ModelSource(str(p))) for i, p in enumerate(random_pool["adapters"])]
    if "saved" in kinds:  # a LoRA with modules_to_save
        candidates.append(CandidateSpec("saved0", base, ModelSource(str(random_pool["saved_adapter"]))))
    if "dense" in kinds:
        candidates += [CandidateSpec(f"dense{i}", ModelSource(str(p))) for i, p in enumerate(random_pool["dense"])]
    return PoolSpec(base=base, candidates=tuple(candidates))


def peft_deltas(base_dir, adapter_dir) -> Dict[str, torch.Tensor]:
    """Each targeted weight's delta as PEFT itself computes it (modules_to_save:
    the saved copy minus the original)."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float64), str(adapter_dir))
    out = {}
    for name, module in model.named_modules():
        key = name.removeprefix("base_model.model.") + ".weight"
        if isinstance(module, LoraLayer):
            out[key] = module.get_delta_weight("default").detach().to(torch.float64)
        elif isinstance(module, ModulesToSaveWrapper):
            saved, original = module.modules_to_save["default"].weight, module.original_module.weight
            out[key] = (saved - original).detach().to(torch.float64)
    return out


def all_deltas(random_pool, spec: PoolSpec) -> List[Dict[str, torch.Tensor]]:
    base = AutoModelForCausalLM.from_pretrained(str(random_pool["base"]), dtype=torch.float64).state_dict()
    deltas = []
    for candidate in spec.candidates:
        if candidate.lora is not None:
            deltas.append(peft_deltas(random_pool["base"], candidate.lora.path))
        else:
            sd = AutoModelForCausalLM.from_pretrained(candidate.model.path, dtype=torch.float64).state_dict()
            deltas.append({k: sd[k] - base[k] for k in base})
    return deltas


def make_oracle(random_pool, spec: PoolSpec, batch_size: int = 4, objective: str = "cross_entropy", merge_fn: str = "convex", density: float = 0.5,
                **positions):
    tokenizer = AutoTokenizer.from_pretrained(str(random_pool["base"]))
    calibration = build_calibration(
        random_pool["calibration"], tokenizer, samples_per_task=100, batch_size=batch_size, max_length=64, objective=objective,
        **positions,
    )
    pool = open_pool(spec)
    model = AutoModelForCausalLM.from_pretrained(str(random_pool["base"]), dtype=torch.float64)
    merge = merge_function(merge_fn, density, ties=ties_merge_function) if merge_fn != "convex" else None
    return Oracle(model, pool, calibration, merge=merge), pool, calibration


def merged_dense_model(random_pool, spec, tensors, coefficients, *, merge_fn: str = "convex", density: float = 0.5,
                       deltas=None):
    """The merge at ``coefficients`` built densely in float64 from PEFT's own deltas
    (``deltas``: other rows, one dict of tensors per row of ``coefficients``)."""
    from mergekit.merge_methods.api import merge_tensors

    deltas = all_deltas(random_pool, spec) if deltas is None else deltas
    model = AutoModelForCausalLM.from_pretrained(str(random_pool["base"]), dtype=torch.float64)
    if "lm_head.weight" in tensors and "lm_head.weight" not in dict(model.named_parameters()):
        # a tied head the pool moves apart: PEFT's merge writes it apart from the embeddings
        model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for l, tensor in enumerate(tensors):
            touching = [i for i, delta in enumerate(deltas) if tensor in delta]
            base = params[tensor].detach().clone()
            if merge_fn == "convex":
                for i in touching:
                    params[tensor].add_(coefficients[i, l] * deltas[i][tensor])
            else:
                params[tensor].copy_(merge_tensors(
                    [base, *(base + deltas[i][tensor] for i in touching)], "ties", base_index=0,
                    parameters={"weight": [float(coefficients[i, l]) for i in touching], "density": density, "normalize": False, "lambda": 1.0},
                ))
    return model


def brute_force(random_pool, spec, tensors, coefficients, calibration, *, merge_fn: str = "convex", density: float = 0.5,
                deltas=None):
    """Loss, scores <dL/dW_l, delta_i[l]> and per-task scores, with the merge built
    densely in W (for ties: mergekit's ties over every full tensor, zero weights included)."""
    deltas = all_deltas(random_pool, spec) if deltas is None else deltas
    model = merged_dense_model(random_pool, spec, tensors, coefficients, merge_fn=merge_fn, density=density, deltas=deltas)
    params = dict(model.named_parameters())
    weights = position_weights(calibration)
    n_tasks = len(calibration.tasks)
    total = 0.0
    task_scores = torch.zeros(n_tasks, len(deltas), len(tensors), dtype=torch.float64)
    for task in range(n_tasks):
        model.zero_grad()
        for batch in calibration.batches:
            if batch.task != task:
                continue
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = batch_loss(logits, batch, weights, calibration.objective)
            loss.backward()
            total += float(loss.detach())
        for l, tensor in enumerate(tensors):
            for i, delta in enumerate(deltas):
                if tensor in delta and params[tensor].grad is not None:
                    task_scores[task, i, l] = torch.sum(params[tensor].grad * delta[tensor])
    return total, task_scores.sum(0), task_scores


def assert_scores_match_brute_force(random_pool, kinds, *, seed: int, scale: float, objective: str = "cross_entropy", merge_fn: str = "convex"):
    """Oracle loss, scores and per-task scores at a random point equal the brute force."""
    spec = pool_spec(random_pool, kinds=kinds)
    oracle, pool, calibration = make_oracle(random_pool, spec, objective=objective, merge_fn=merge_fn)
    torch.manual_seed(seed)
    coefficients = torch.rand(len(pool.candidates), len(oracle.tensors), dtype=torch.float64) * scale
    evaluation = oracle.evaluate(coefficients, per_task=True)
    ref_loss, ref_scores, ref_task_scores = brute_force(random_pool, spec, oracle.tensors, coefficients, calibration, merge_fn=merge_fn)
    assert abs(evaluation.loss - ref_loss) < 1e-9 * max(1.0, abs(ref_loss))
    assert float(ref_scores.abs().max()) > 1e-6  # the check is not vacuous
    torch.testing.assert_close(evaluation.scores, ref_scores, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(evaluation.task_scores, ref_task_scores, rtol=1e-4, atol=1e-10)
    # the totals without per-task harvesting are the same numbers
    torch.testing.assert_close(oracle.evaluate(coefficients).scores, evaluation.scores, rtol=1e-9, atol=1e-12)
    return evaluation.scores, ref_scores
