from tests.oracle.helpers import assert_scores_match_brute_force


def test_dense_scores_equal_brute_force(random_pool):
    assert_scores_match_brute_force(random_pool, ("dense",), seed=2, scale=0.5)


def test_mixed_pool_scores_equal_brute_force(random_pool):
    assert_scores_match_brute_force(random_pool, ("lora", "dense"), seed=3, scale=0.3)
