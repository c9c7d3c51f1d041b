"""Full tensors and deltas a block of rows at a time (``mergekit_fw.pool.rows``)."""

import pytest
import torch

from mergekit_fw.pool import rows
from mergekit_fw.pool.candidates import DenseCandidate, LoraCandidate
from mergekit_fw.pool.pool import open_pool
from tests.oracle.helpers import pool_spec


@pytest.mark.parametrize("shape", [(7,), (10, 3), (33, 4, 2), (1, 5)])
def test_row_blocks_cover_every_row_once_in_order(monkeypatch, shape):
    monkeypatch.setattr(rows, "BLOCK_ELEMENTS", 8)
    blocks = list(rows.row_blocks(shape))
    assert blocks[0][0] == 0 and blocks[-1][1] == shape[0]
    assert all(stop == nxt for (_, stop), (nxt, _) in zip(blocks, blocks[1:]))
    width = 1
    for size in shape[1:]:
        width *= size
    assert all(0 < stop - start <= max(1, 8 // width) for start, stop in blocks)
    assert len(blocks) > 1 or shape[0] * width <= 8


@pytest.fixture(scope="module")
def mixed(random_pool):
    """LoRAs, one with a saved lm_head, and full checkpoints over the same base."""
    return open_pool(pool_spec(random_pool, kinds=("lora", "saved", "dense")))


def test_delta_rows_concatenate_to_the_whole_delta(mixed, monkeypatch):
    """Every candidate kind and every tensor it moves (matrices, 1-D norms, the
    saved lm_head), in blocks far smaller than the tensor."""
    monkeypatch.setattr(rows, "BLOCK_ELEMENTS", 20)
    kinds = set()
    for candidate in mixed.candidates:
        for name in candidate.tensor_names():
            with rows.stored_rows(mixed.base_index, name) as base_rows:
                base = mixed.base_index.get(name)
                if base.dim() == 0:
                    continue
                with rows.delta_rows(candidate, name, base_rows, torch.float32) as deltas:
                    blocks = [deltas(start, stop) for start, stop in rows.row_blocks(base.shape)]
            whole = candidate.delta(name, base)
            assert whole is not None
            if candidate.is_low_rank(name):  # a GEMM of row blocks may round differently
                torch.testing.assert_close(torch.cat(blocks), whole, rtol=1e-6, atol=1e-7)
            else:  # the same subtraction, element by element
                assert torch.equal(torch.cat(blocks), whole)
            kinds.add((type(candidate).__name__, candidate.is_low_rank(name), base.dim()))
            if base.shape[0] * base[0].numel() > 20:
                assert len(blocks) > 1
    assert {("LoraCandidate", True, 2), ("LoraCandidate", False, 2), ("DenseCandidate", False, 2),
            ("DenseCandidate", False, 1)} <= kinds


def test_delta_norm_is_the_whole_deltas_float64_norm(mixed, monkeypatch):
    monkeypatch.setattr(rows, "BLOCK_ELEMENTS", 20)
    checked = 0
    for candidate in mixed.candidates:
        for name in candidate.tensor_names():
            delta = candidate.delta(name, mixed.base_index.get(name))
            assert delta is not None
            expected = float(torch.linalg.vector_norm(delta.to(torch.float64)))
            assert rows.delta_norm(candidate, name, mixed.base_index) == pytest.approx(expected, rel=1e-6)
            checked += expected > 0
    assert checked > 10


def test_a_non_finite_row_anywhere_makes_the_norm_non_finite(mixed, monkeypatch, tmp_path):
    """Validation's NaN check reads the norm: one bad row in any block must show."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(rows, "BLOCK_ELEMENTS", 20)
    saved = next(c for c in mixed.candidates if isinstance(c, LoraCandidate) and c.full)
    name = next(iter(saved.full))
    state = load_file(str(saved.weights_file))
    key = saved.full[name]
    state[key][-1, -1] = float("nan")  # the last block's last element
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((saved.adapter_dir / "adapter_config.json").read_text())
    save_file(state, str(folder / "adapter_model.safetensors"))
    broken = LoraCandidate(saved.name, folder, saved.factors, saved.full)
    assert not torch.isfinite(torch.tensor(rows.delta_norm(broken, name, mixed.base_index)))


def test_no_whole_delta_of_a_full_tensor_is_formed_under_convex(random_pool, monkeypatch):
    """Validation, the dense oracle's merge and scores and the cosine norms read
    full tensors a block of rows at a time: a whole delta (1 GB of float32 for a 7B's
    lm_head, with the value and base beside it) is never formed."""
    from tests.oracle.helpers import make_oracle

    def refuse(self, tensor, base=None):
        raise AssertionError(f"whole delta of {tensor} formed")

    spec = pool_spec(random_pool, kinds=("lora", "saved", "dense"))
    oracle, pool, _ = make_oracle(random_pool, spec)
    monkeypatch.setattr(LoraCandidate, "delta", refuse)
    monkeypatch.setattr(DenseCandidate, "delta", refuse)
    from mergekit_fw.pool.validate import _norms

    for candidate in pool.candidates:
        _norms(candidate, pool.base_index)
    coefficients = torch.full((len(pool.candidates), len(oracle.tensors)), 0.2, dtype=torch.float64)
    evaluation = oracle.evaluate(coefficients)
    assert float(evaluation.scores.abs().max()) > 0
    assert float(oracle.vertex_norms().max()) > 0
