import torch

from tests.oracle.helpers import assert_scores_match_brute_force, make_oracle, pool_spec


def test_gate_gradients_equal_dense_brute_force(random_pool):
    scores, ref_scores = assert_scores_match_brute_force(random_pool, ("lora",), seed=1, scale=0.5)
    # untargeted (adapter, tensor) pairs score exactly zero
    assert torch.all(scores[ref_scores == 0] == 0)


def test_loss_only_matches_loss_with_scores(random_pool):
    spec = pool_spec(random_pool, kinds=("lora",))
    oracle, pool, _ = make_oracle(random_pool, spec)
    coefficients = torch.full((len(pool.candidates), len(oracle.tensors)), 0.3, dtype=torch.float64)
    loss, _ = oracle.loss_and_scores(coefficients)
    assert abs(oracle.loss(coefficients) - loss) < 1e-12
    assert oracle.lora.gates.grad is None and not oracle.lora.gates.requires_grad


def test_lora_factors_match_peft_deltas(random_pool):
    """Our adapter parsing (scale, rsLoRA, per-module rank) equals PEFT's own delta."""
    from mergekit_fw.pool.pool import open_pool
    from tests.oracle.helpers import peft_deltas

    pool = open_pool(pool_spec(random_pool, kinds=("lora",)))
    for candidate, adapter in zip(pool.candidates, random_pool["adapters"]):
        reference = peft_deltas(random_pool["base"], adapter)
        assert set(reference) == set(candidate.factors)
        for tensor, delta in reference.items():
            torch.testing.assert_close(candidate.factors[tensor].delta(torch.float64), delta, rtol=1e-5, atol=1e-7)
