"""The per-rank probe's maths against mergekit-fw's own oracle: with the gates of one
adapter tied together it is the layer-wise merge FW optimises, and per rank component its
hooked model is the model its merged weights make."""

import torch

from evals.probe_per_rank import GatedPool, mean_loss
from tests.oracle.helpers import make_oracle, pool_spec


def _model(random_pool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(random_pool["base"]), dtype=torch.float32)
    model.requires_grad_(False)
    return model


def test_tied_gates_are_the_layer_wise_merge_of_the_oracle(random_pool):
    oracle, pool, calibration = make_oracle(random_pool, pool_spec(random_pool, kinds=("lora",)))
    tensors = pool.tensor_names()
    torch.manual_seed(0)
    table = torch.rand(len(pool.candidates), len(tensors), dtype=torch.float64)
    expected = oracle.loss(table)
    oracle.close()
    model = _model(random_pool)
    gated = GatedPool(model, pool, shared=True)
    with torch.no_grad():  # each module's gates: the candidates that move it, in pool order
        for (tensor, *_), gate in zip(gated.paths, gated.gates):
            rows = [i for i, candidate in enumerate(pool.candidates) if tensor in candidate.factors]
            gate.copy_(table[rows, tensors.index(tensor)].float())
    assert gated.count() == sum(len(c.factors) for c in pool.candidates)
    assert abs(mean_loss(model, calibration) - expected) <= 1e-5 * expected
    gated.remove()
    assert abs(mean_loss(model, calibration) - oracle_loss_at_base(random_pool)) <= 1e-5 * expected


def oracle_loss_at_base(random_pool) -> float:
    oracle, pool, _ = make_oracle(random_pool, pool_spec(random_pool, kinds=("lora",)))
    try:
        return oracle.loss(torch.zeros(len(pool.candidates), len(pool.tensor_names()), dtype=torch.float64))
    finally:
        oracle.close()


def test_per_rank_gates_fold_into_the_weights(random_pool):
    _, pool, calibration = make_oracle(random_pool, pool_spec(random_pool, kinds=("lora",)))
    model = _model(random_pool)
    gated = GatedPool(model, pool, shared=False)
    assert gated.count() == sum(f.rank for c in pool.candidates for f in c.factors.values())
    torch.manual_seed(1)
    with torch.no_grad():
        for gate in gated.gates:
            gate.uniform_(0.0, 1.0)
    hooked = mean_loss(model, calibration)
    state = gated.merged_state(model)
    gated.remove()
    assert abs(mean_loss(model, calibration) - hooked) > 1e-4 * hooked  # the hooks did move the model
    model.load_state_dict(state)
    assert abs(mean_loss(model, calibration) - hooked) <= 1e-5 * hooked
