import torch

from tests.oracle.helpers import brute_force, make_oracle, pool_spec


def test_dense_scores_equal_brute_force(random_pool):
    spec = pool_spec(random_pool, kinds=("dense",))
    oracle, pool, calibration = make_oracle(random_pool, spec)
    torch.manual_seed(2)
    coefficients = torch.rand(len(pool.candidates), len(oracle.tensors), dtype=torch.float64) * 0.5
    loss, scores = oracle.loss_and_scores(coefficients)
    ref_loss, ref_scores = brute_force(random_pool, spec, oracle.tensors, coefficients, calibration)
    assert abs(loss - ref_loss) < 1e-9 * max(1.0, abs(ref_loss))
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-10)


def test_mixed_pool_scores_equal_brute_force(random_pool):
    spec = pool_spec(random_pool, kinds=("lora", "dense"))
    oracle, pool, calibration = make_oracle(random_pool, spec)
    torch.manual_seed(3)
    coefficients = torch.rand(len(pool.candidates), len(oracle.tensors), dtype=torch.float64) * 0.3
    loss, scores = oracle.loss_and_scores(coefficients)
    ref_loss, ref_scores = brute_force(random_pool, spec, oracle.tensors, coefficients, calibration)
    assert abs(loss - ref_loss) < 1e-9 * max(1.0, abs(ref_loss))
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-10)
