"""``Oracle.task_losses`` (what ``screen_by: loss`` reads): each calibration task's loss
at a point, in one forward pass, against the merge built densely from PEFT's own deltas."""

import pytest
import torch

from mergekit_fw.objective import batch_loss, position_weights
from tests.oracle.helpers import make_oracle, merged_dense_model, pool_spec


def test_each_tasks_loss_is_the_dense_merges_in_one_forward_pass(random_pool):
    spec = pool_spec(random_pool)
    oracle, pool, calibration = make_oracle(random_pool, spec)
    torch.manual_seed(5)
    point = torch.rand(len(pool.candidates), len(oracle.tensors), dtype=torch.float64) * 0.5
    before = oracle.passes()
    losses = oracle.task_losses(point)
    after = oracle.passes()
    assert after["forward"] - before["forward"] == pytest.approx(1) and after["gradient"] == before["gradient"]

    model = merged_dense_model(random_pool, spec, oracle.tensors, point)
    weights = position_weights(calibration)
    expected = torch.zeros(len(calibration.tasks), dtype=torch.float64)
    with torch.no_grad():
        for batch in calibration.batches:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            expected[batch.task] += float(batch_loss(logits, batch, weights, calibration.objective))
    assert len(calibration.tasks) > 1 and bool((expected > 0).all())
    torch.testing.assert_close(losses, expected, rtol=1e-9, atol=0)
    # the same split as the gradient pass's, and the whole loss
    torch.testing.assert_close(losses, oracle.evaluate(point).task_losses, rtol=1e-12, atol=0)
    assert float(losses.sum()) == pytest.approx(oracle.loss(point), rel=1e-12)
