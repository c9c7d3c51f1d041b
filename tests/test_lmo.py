import torch

from mergekit_fw.lmo import candidate_coefficients, fw_gap, layerwise_choice, one_hot, vertex_scores


def test_layerwise_choice_and_gap():
    scores = torch.tensor([[-1.0, 2.0, 0.0], [0.5, -3.0, 0.0]], dtype=torch.float64)
    vs = vertex_scores(scores)
    assert vs.shape == (3, 3)
    choice = layerwise_choice(vs)
    assert choice.tolist() == [1, 2, 0]  # all-zero column keeps the base
    weights = torch.tensor([[0.5, 1.0, 1.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    # gap = sum_l <w_l, vs_l> - vs[choice_l, l]
    expected = (0.5 * -1.0 - (-1.0)) + (0.0 - (-3.0)) + 0.0
    assert abs(fw_gap(weights, vs, choice) - expected) < 1e-12


def test_gap_is_nonnegative_and_zero_at_the_chosen_vertex():
    torch.manual_seed(0)
    for _ in range(50):
        scores = torch.randn(4, 7, dtype=torch.float64)
        vs = vertex_scores(scores)
        weights = torch.rand(5, 7, dtype=torch.float64)
        weights /= weights.sum(0)
        choice = layerwise_choice(vs)
        assert fw_gap(weights, vs, choice) >= 0
        assert abs(fw_gap(one_hot(choice, 5), vs, choice)) < 1e-12


def test_init_vertex_scores_and_coefficients():
    scores = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    init = torch.tensor([[0.5, 0.5], [0.5, 1.0]], dtype=torch.float64)
    vs = vertex_scores(scores, init)
    torch.testing.assert_close(vs[3], torch.tensor([2.0, 0.0], dtype=torch.float64))
    weights = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 0.0], [0.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(candidate_coefficients(weights, 2, init), torch.tensor([[0.75, 0.5], [0.25, 1.0]], dtype=torch.float64))
