import torch

from mergekit_fw.solve.constraints import Hull, fw_gap, gain
from mergekit_fw.solve.lmo import one_hot, ranked_points, ranking, vertex_norms, vertex_scores

HULL = Hull()


def lmo_point(rank: torch.Tensor, n_tensors: int) -> torch.Tensor:
    return ranked_points(rank, n_tensors, 1)[0]


def test_layerwise_choice_and_gap():
    scores = torch.tensor([[-1.0, 2.0, 0.0], [0.5, -3.0, 0.0]], dtype=torch.float64)
    vs = vertex_scores(scores)
    assert vs.shape == (3, 3)
    choice = lmo_point(ranking(vs, "layer", "inner_product"), 3)
    assert choice.tolist() == [1, 2, 0]  # all-zero column keeps the base
    weights = torch.tensor([[0.5, 1.0, 1.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    # gap = sum_l <w_l, vs_l> - min_v vs[v, l]
    expected = (0.5 * -1.0 - (-1.0)) + (0.0 - (-3.0)) + 0.0
    assert abs(fw_gap(HULL, weights, vs) - expected) < 1e-12
    assert abs(gain(weights, vs, one_hot(choice, 3)) - expected) < 1e-12


def test_taskwise_choice_sums_over_tensors():
    # candidate 1 wins tensor 0 by a little, candidate 2 wins tensor 1 by a lot
    scores = torch.tensor([[-1.0, -0.5], [-0.9, -3.0]], dtype=torch.float64)
    vs = vertex_scores(scores)
    assert lmo_point(ranking(vs, "layer", "inner_product"), 2).tolist() == [1, 2]
    assert lmo_point(ranking(vs, "task", "inner_product"), 2).tolist() == [2, 2]
    top = ranked_points(ranking(vs, "task", "inner_product"), 2, 5)
    assert [p.tolist() for p in top] == [[2, 2], [1, 1], [0, 0]]  # k clipped to the vertices


def test_cosine_divides_by_the_vertex_norm_only():
    scores = torch.tensor([[-4.0, 0.0], [-3.0, 1.0]], dtype=torch.float64)
    norms = torch.tensor([[8.0, 0.0], [3.0, 2.0]], dtype=torch.float64)
    vs, vn = vertex_scores(scores), vertex_norms(norms)
    cos = ranking(vs, "layer", "cosine", vn)
    torch.testing.assert_close(cos, torch.tensor([[0.0, 0.0], [-0.5, 0.0], [-1.0, 0.5]], dtype=torch.float64))
    # inner product prefers the long vector 1, cosine the aligned vector 2
    assert lmo_point(ranking(vs, "layer", "inner_product"), 2).tolist() == [1, 0]
    assert lmo_point(cos, 2).tolist() == [2, 0]
    # task-wise cosine: summed score over the model's norm
    torch.testing.assert_close(
        ranking(vs, "task", "cosine", vn), torch.tensor([0.0, -4.0 / 8.0, -2.0 / 13 ** 0.5], dtype=torch.float64)
    )


def test_gap_is_nonnegative_and_zero_at_the_chosen_vertex():
    torch.manual_seed(0)
    for _ in range(50):
        scores = torch.randn(4, 7, dtype=torch.float64)
        vs = vertex_scores(scores)
        weights = torch.rand(5, 7, dtype=torch.float64)
        weights /= weights.sum(0)
        choice = lmo_point(ranking(vs, "layer", "inner_product"), 7)
        assert fw_gap(HULL, weights, vs) >= 0
        assert abs(fw_gap(HULL, one_hot(choice, 5), vs)) < 1e-12
        # the task-wise point never promises more than the layer-wise certificate
        task = lmo_point(ranking(vs, "task", "inner_product"), 7)
        assert gain(weights, vs, one_hot(task, 5)) <= fw_gap(HULL, weights, vs) + 1e-12
