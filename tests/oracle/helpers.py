"""Brute-force references for the oracle tests: dense merged weights and autograd."""

from __future__ import annotations

from typing import Dict, List

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoTokenizer, LlamaForCausalLM

from mergekit_fw.calibration import build_calibration
from mergekit_fw.objective import batch_cross_entropy, token_weights
from mergekit_fw.oracle import Oracle
from mergekit_fw.pool import CandidateSpec, ModelSource, PoolSpec, open_pool


def pool_spec(random_pool, kinds=("lora", "dense")) -> PoolSpec:
    base = ModelSource(str(random_pool["base"]))
    candidates = []
    if "lora" in kinds:
        candidates += [CandidateSpec(f"lora{i}", base, ModelSource(str(p))) for i, p in enumerate(random_pool["adapters"])]
    if "dense" in kinds:
        candidates += [CandidateSpec(f"dense{i}", ModelSource(str(p))) for i, p in enumerate(random_pool["dense"])]
    return PoolSpec(base=base, candidates=tuple(candidates))


def peft_deltas(base_dir, adapter_dir) -> Dict[str, torch.Tensor]:
    """Each targeted weight's delta as PEFT itself computes it."""
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float64), str(adapter_dir))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            key = name.removeprefix("base_model.model.") + ".weight"
            out[key] = module.get_delta_weight("default").detach().to(torch.float64)
    return out


def all_deltas(random_pool, spec: PoolSpec) -> List[Dict[str, torch.Tensor]]:
    base = LlamaForCausalLM.from_pretrained(str(random_pool["base"]), dtype=torch.float64).state_dict()
    deltas = []
    for candidate in spec.candidates:
        if candidate.lora is not None:
            deltas.append(peft_deltas(random_pool["base"], candidate.lora.path))
        else:
            sd = LlamaForCausalLM.from_pretrained(candidate.model.path, dtype=torch.float64).state_dict()
            deltas.append({k: sd[k] - base[k] for k in base})
    return deltas


def make_oracle(random_pool, spec: PoolSpec, batch_size: int = 4):
    tokenizer = AutoTokenizer.from_pretrained(str(random_pool["base"]))
    calibration = build_calibration(random_pool["calibration"], tokenizer, samples_per_task=100, batch_size=batch_size, max_length=64)
    pool = open_pool(spec)
    model = LlamaForCausalLM.from_pretrained(str(random_pool["base"]), dtype=torch.float64)
    return Oracle(model, pool, calibration), pool, calibration


def brute_force(random_pool, spec, tensors, coefficients, calibration):
    """Loss and <dL/dW_l, delta_i[l]> with every delta merged densely into W."""
    deltas = all_deltas(random_pool, spec)
    model = LlamaForCausalLM.from_pretrained(str(random_pool["base"]), dtype=torch.float64)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for l, tensor in enumerate(tensors):
            for i, delta in enumerate(deltas):
                if tensor in delta:
                    params[tensor].add_(coefficients[i, l] * delta[tensor])
    weights = token_weights(calibration)
    total = 0.0
    for batch in calibration.batches:
        loss = batch_cross_entropy(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch, weights)
        loss.backward()
        total += float(loss)
    scores = torch.zeros(len(deltas), len(tensors), dtype=torch.float64)
    for l, tensor in enumerate(tensors):
        for i, delta in enumerate(deltas):
            if tensor in delta:
                scores[i, l] = torch.sum(params[tensor].grad * delta[tensor])
    return total, scores


def assert_scores_match_brute_force(random_pool, kinds, *, seed: int, scale: float):
    """Oracle loss and scores at a random feasible-ish point equal the brute force."""
    spec = pool_spec(random_pool, kinds=kinds)
    oracle, pool, calibration = make_oracle(random_pool, spec)
    torch.manual_seed(seed)
    coefficients = torch.rand(len(pool.candidates), len(oracle.tensors), dtype=torch.float64) * scale
    loss, scores = oracle.loss_and_scores(coefficients)
    ref_loss, ref_scores = brute_force(random_pool, spec, oracle.tensors, coefficients, calibration)
    assert abs(loss - ref_loss) < 1e-9 * max(1.0, abs(ref_loss))
    assert float(ref_scores.abs().max()) > 1e-6  # the check is not vacuous
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-10)
    return scores, ref_scores
