"""The entropy objective at answer positions: which positions count, the greedy
answers the oracle decodes at the starting point, and the loss and scores there
against a dense brute force."""

from __future__ import annotations

import pytest
import torch

from mergekit_fw.calibration.batches import pad_token_id
from mergekit_fw.objective import batch_loss, position_weights
from tests.oracle.helpers import brute_force, make_oracle, merged_dense_model, pool_spec


def test_answer_positions_are_the_last_prompt_position(random_pool):
    _, _, calibration = make_oracle(random_pool, pool_spec(random_pool, ("lora",)), objective="entropy")
    rows = 0
    for batch in calibration.batches:
        lengths = batch.attention_mask.sum(dim=1)
        for row in range(batch.positions.shape[0]):
            assert batch.positions[row].nonzero().flatten().tolist() == [int(lengths[row]) - 1]
        rows += batch.positions.shape[0]
    assert float(calibration.counted_positions.sum()) == rows


def test_prompt_positions_count_every_prompt_token(random_pool):
    _, _, calibration = make_oracle(random_pool, pool_spec(random_pool, ("lora",)), objective="entropy",
                                    entropy_positions="prompt")
    for batch in calibration.batches:
        assert torch.equal(batch.positions, batch.attention_mask.bool())


def test_decoded_answers_are_the_greedy_continuation_of_the_point(random_pool):
    """k answer positions per row: the last prompt position and the k - 1 tokens the
    merge at the point decodes greedily, checked row by row against ``generate`` on a
    dense copy of the same merge; the loss and scores there against the brute force."""
    from transformers import AutoTokenizer

    k = 3
    spec = pool_spec(random_pool, ("lora", "dense"))
    oracle, pool, calibration = make_oracle(random_pool, spec, objective="entropy", answer_tokens=k)
    assert calibration.answer_tokens == k
    assert float(calibration.counted_positions.sum()) == k * calibration.num_examples
    torch.manual_seed(7)
    coefficients = torch.rand(len(pool.candidates), len(oracle.tensors), dtype=torch.float64) * 0.4
    tokenizer = AutoTokenizer.from_pretrained(str(random_pool["base"]))
    oracle.decode_answers(coefficients, pad_id=pad_token_id(tokenizer))
    assert oracle.passes()["forward"] == pytest.approx(k - 1)

    dense = merged_dense_model(random_pool, spec, oracle.tensors, coefficients).eval()
    checked = 0
    for before, after in zip(calibration.batches, oracle.batches):
        for row in range(before.input_ids.shape[0]):
            n = int(before.attention_mask[row].sum())
            prompt = before.input_ids[row, :n][None]
            expected = dense.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=k - 1,
                                      do_sample=False, pad_token_id=pad_token_id(tokenizer))[0, n:]
            assert after.input_ids[row, n : n + k - 1].tolist() == expected.tolist()
            assert after.positions[row].nonzero().flatten().tolist() == list(range(n - 1, n + k - 1))
            checked += 1
    assert checked == calibration.num_examples

    # the decoded set is the objective from now on: loss and scores equal the brute force on it
    decoded = type(calibration)(calibration.tasks, oracle.batches, calibration.counted_positions, "entropy", k)
    evaluation = oracle.evaluate(coefficients)
    ref_loss, ref_scores, _ = brute_force(random_pool, spec, oracle.tensors, coefficients, decoded)
    assert evaluation.loss == pytest.approx(ref_loss, rel=1e-9)
    torch.testing.assert_close(evaluation.scores, ref_scores, rtol=1e-4, atol=1e-10)
    # and the task weights were fixed before decoding: k positions per row
    with torch.no_grad():
        direct = sum(float(batch_loss(dense(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b,
                                      position_weights(decoded), "entropy")) for b in oracle.batches)
    assert direct == pytest.approx(ref_loss, rel=1e-9)


def test_one_answer_token_decodes_nothing(random_pool):
    oracle, pool, calibration = make_oracle(random_pool, pool_spec(random_pool, ("lora",)), objective="entropy")
    before = list(oracle.batches)
    oracle.decode_answers(torch.zeros(len(pool.candidates), len(oracle.tensors), dtype=torch.float64), pad_id=0)
    assert oracle.batches == before
    assert oracle.passes() == {"forward": 0.0, "gradient": 0.0}
