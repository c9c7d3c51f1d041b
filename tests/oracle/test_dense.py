import torch

from tests.oracle.helpers import assert_scores_match_brute_force


def test_dense_scores_equal_brute_force(random_pool):
    assert_scores_match_brute_force(random_pool, ("dense",), seed=2, scale=0.5)


def test_mixed_pool_scores_equal_brute_force(random_pool):
    assert_scores_match_brute_force(random_pool, ("lora", "dense"), seed=3, scale=0.3)


def test_entropy_objective_scores_equal_brute_force(random_pool):
    assert_scores_match_brute_force(random_pool, ("lora", "dense"), seed=4, scale=0.3, objective="entropy")


def test_ties_merge_function_scores_equal_brute_force(random_pool):
    """With merge_fn ties every candidate takes the dense path; the model is
    mergekit's ties at the coefficients and the scores are <grad, delta_i>."""
    assert_scores_match_brute_force(random_pool, ("lora", "dense"), seed=5, scale=0.5, merge_fn="ties")


def test_vertex_norms_equal_dense_norms(random_pool):
    import torch

    from tests.oracle.helpers import all_deltas, make_oracle, pool_spec

    spec = pool_spec(random_pool)
    oracle, _, _ = make_oracle(random_pool, spec)
    deltas = all_deltas(random_pool, spec)
    expected = torch.tensor(
        [[float(torch.linalg.vector_norm(d[t])) if t in d else 0.0 for t in oracle.tensors] for d in deltas],
        dtype=torch.float64,
    )
    assert float(expected.max()) > 0
    torch.testing.assert_close(oracle.vertex_norms(), expected, rtol=1e-5, atol=1e-9)


def test_modules_to_save_scores_equal_brute_force(random_pool):
    """An adapter that retrains lm_head: its factors go through the gates, its
    saved lm_head through the dense path, in one row of the score table."""
    scores, _ = assert_scores_match_brute_force(random_pool, ("lora", "saved"), seed=6, scale=0.4)
    assert float(scores[-1].abs().max()) > 0  # the saved adapter's row is scored


def test_modules_to_save_with_checkpoints_equal_brute_force(random_pool):
    assert_scores_match_brute_force(random_pool, ("lora", "saved", "dense"), seed=7, scale=0.3)


def test_blocked_float64_dot_equals_the_whole_product(monkeypatch):
    """Scores of embedding-sized tensors are summed a block at a time (a 7B's lm_head
    would need 3 GB of float64 copies at once); the sum is the same."""
    from mergekit_fw.oracle import dense

    monkeypatch.setattr(dense, "DOT_BLOCK", 1000)
    torch.manual_seed(0)
    grad = torch.randn(97, 61, dtype=torch.bfloat16)  # 5917 entries: 5 full blocks and a ragged one
    delta = torch.randn(97, 61, dtype=torch.float32)
    whole = torch.sum(grad.to(torch.float64) * delta.to(torch.float64))
    blocked = dense.dot64(grad, delta)
    assert blocked.dtype == torch.float64
    assert abs(float(blocked - whole)) <= 1e-12 * float(torch.sum((grad.double() * delta.double()).abs()))
    assert float(dense.dot64(grad, torch.zeros_like(delta))) == 0.0


def test_scores_in_small_row_blocks_equal_brute_force(random_pool, monkeypatch):
    """The dense merge and scores go a block of rows at a time (a 7B's lm_head in
    whole float32 copies was most of the oracle's memory); with blocks of a few
    rows, so that every matrix spans many, the numbers are those of the brute force."""
    from mergekit_fw.pool import rows

    monkeypatch.setattr(rows, "BLOCK_ELEMENTS", 40)
    assert_scores_match_brute_force(random_pool, ("lora", "saved", "dense"), seed=8, scale=0.3)
