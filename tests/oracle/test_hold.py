"""Members held at 0 (the screen's dropped ones) leave the oracle's model: the loss and
the others' scores are what they were, the held ones score 0 and cost nothing, and a
point that moves one is refused."""

import pytest
import torch

from tests.oracle.helpers import make_oracle, pool_spec


def _bank_rank(oracle) -> int:
    return sum(int(bank.A.shape[0]) for bank in oracle.lora._banks if bank is not None)


@pytest.mark.parametrize("merge_fn", ["convex", "ties"])
def test_held_members_leave_the_model_and_the_others_score_as_before(random_pool, merge_fn):
    oracle, pool, _ = make_oracle(random_pool, pool_spec(random_pool), merge_fn=merge_fn)
    lora = [row for row, _ in pool.lora_candidates()]
    dense = [row for row, _ in pool.dense_candidates()]
    held = [lora[0], dense[0]]
    kept = [row for row in range(len(pool.candidates)) if row not in held]
    torch.manual_seed(3)
    point = torch.rand(len(pool.candidates), len(oracle.tensors), dtype=torch.float64) * 0.5
    point[held] = 0.0
    before = oracle.evaluate(point, per_task=True)
    assert float(before.scores[held].abs().max(dim=1).values.min()) > 0  # each held member scores at first
    rank = _bank_rank(oracle) if oracle.lora is not None else 0

    oracle.hold(held)
    after = oracle.evaluate(point, per_task=True)
    assert abs(after.loss - before.loss) <= 1e-12 * abs(before.loss)
    torch.testing.assert_close(after.scores[kept], before.scores[kept], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(after.task_scores[:, kept], before.task_scores[:, kept], rtol=1e-9, atol=1e-12)
    assert float(after.scores[held].abs().max()) == 0.0 and float(after.task_scores[:, held].abs().max()) == 0.0
    assert abs(oracle.loss(point) - before.loss) <= 1e-12 * abs(before.loss)
    if merge_fn == "convex":  # the held adapter's rank slices are cut out of every module's bank
        assert _bank_rank(oracle) == rank - sum(f.rank for f in pool.candidates[lora[0]].factors.values())

    moved = point.clone()
    moved[lora[0], 0] = 0.1
    with pytest.raises(ValueError, match=f"coefficients on members held at 0: {pool.candidates[lora[0]].name}"):
        oracle.evaluate(moved)

    oracle.hold(())  # every member back, as the next solve on this oracle needs
    back = oracle.evaluate(point, per_task=True)
    assert abs(back.loss - before.loss) <= 1e-12 * abs(before.loss)
    torch.testing.assert_close(back.scores, before.scores, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(back.task_scores, before.task_scores, rtol=1e-9, atol=1e-12)
    if merge_fn == "convex":
        assert _bank_rank(oracle) == rank


def test_holding_every_adapter_of_a_module_leaves_the_base_module(random_pool):
    """With every LoRA held, the model is the base plus the full fine-tunes: each
    module's bank is gone and its hook adds nothing."""
    oracle, pool, _ = make_oracle(random_pool, pool_spec(random_pool))
    lora = [row for row, _ in pool.lora_candidates()]
    point = torch.zeros(len(pool.candidates), len(oracle.tensors), dtype=torch.float64)
    point[[row for row, _ in pool.dense_candidates()]] = 0.4
    before = oracle.evaluate(point)
    oracle.hold(lora)
    assert all(bank is None for bank in oracle.lora._banks)
    after = oracle.evaluate(point)
    assert abs(after.loss - before.loss) <= 1e-12 * abs(before.loss)
    assert float(after.scores[lora].abs().max()) == 0.0
    torch.testing.assert_close(after.scores, torch.where(torch.isin(torch.arange(len(pool.candidates)), torch.tensor(lora))[:, None], 0.0, before.scores))
