"""The fast-path writer against a brute-force dense merge, byte for byte where it copies."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mergekit_fw.output.writer import write_merged_model
from mergekit_fw.pool import safetensors_io
from mergekit_fw.pool.pool import open_pool
from mergekit_fw.pool.safetensors_io import read_layout
from mergekit_fw.solve.table import CoefficientTable
from tests.oracle.helpers import all_deltas, pool_spec
from tests.paths import tensors


def _table(pool, seed=0):
    """Random simplex columns; two tensors left at the base, one wholly on dense0."""
    names = pool.tensor_names()
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(1 + len(pool.names), len(names), generator=g, dtype=torch.float64)
    weights[:, [1, 3]] = 0.0
    weights[0, [1, 3]] = 1.0  # base only
    weights[:, 2] = 0.0
    weights[1 + pool.names.index("dense0"), 2] = 1.0  # exactly a stored vertex
    weights /= weights.sum(0, keepdim=True)
    return CoefficientTable(list(pool.names), names, weights, "test", str(pool.base_dir))


def _raw(path, name):
    stored = read_layout(path)[name]
    with open(path, "rb") as handle:
        handle.seek(stored.offset)
        return handle.read(stored.nbytes)


@pytest.fixture(scope="module")
def written(random_pool, tmp_path_factory):
    spec = pool_spec(random_pool, kinds=("lora", "saved", "dense"))  # modules_to_save included
    pool = open_pool(spec)
    table = _table(pool)
    out = tmp_path_factory.mktemp("writer") / "out"
    write_merged_model(pool, table, out, progress=False)
    return pool, table, out, spec


def test_every_tensor_is_the_dense_convex_merge(written, random_pool):
    pool, table, out, spec = written
    base = load_file(str(random_pool["base"] / "model.safetensors"))
    deltas = all_deltas(random_pool, spec)
    got = tensors(out)
    assert got.keys() == base.keys()
    coefficients = table.coefficient_map()
    checked = 0
    for name, value in base.items():
        expected = value.to(torch.float64).clone()
        for candidate, delta in zip(pool.names, deltas):
            if name in delta:
                expected += coefficients.get(name, {}).get(candidate, 0.0) * delta[name]
        torch.testing.assert_close(got[name].to(torch.float64), expected, rtol=1e-5, atol=1e-6)
        checked += name in coefficients
    assert checked == len(table.tensors)
    moved = [n for n in table.tensors if not torch.equal(got[n], base[n])]
    assert len(moved) == len(table.tensors) - 2  # the comparison can fail


def test_untouched_and_vertex_tensors_are_copied_bit_for_bit(written, random_pool):
    pool, table, out, _ = written
    base_file, out_file = random_pool["base"] / "model.safetensors", out / "model.safetensors"
    untouched = [n for n in pool.base_index.names() if n not in table.tensors] + [table.tensors[1], table.tensors[3]]
    assert len(set(untouched)) >= 2
    for name in untouched:
        assert _raw(out_file, name) == _raw(base_file, name), name
    vertex = table.tensors[2]
    assert _raw(out_file, vertex) == _raw(random_pool["dense"][0] / "model.safetensors", vertex)


def test_factors_read_for_writing_are_not_kept(written):
    pool, *_ = written
    assert not any(f.loaded for _, c in pool.lora_candidates() for f in c.factors.values())


def test_out_dtype_and_shards(written, tmp_path):
    pool, table, reference, _ = written
    out = tmp_path / "bf16"
    write_merged_model(pool, table, out, dtype=torch.bfloat16, max_shard_size=4000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    got, full = tensors(out), tensors(reference)
    assert got.keys() == full.keys()
    for name, value in got.items():
        assert value.dtype == (torch.bfloat16 if full[name].is_floating_point() else full[name].dtype)
        torch.testing.assert_close(value, full[name].to(value.dtype), rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_failing_write_leaves_nothing_and_keeps_the_old_output(written, tmp_path, monkeypatch):
    pool, table, reference, _ = written
    out = tmp_path / "out"
    write_merged_model(pool, table, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    original = safetensors_io._write_all

    def failing(handle, data):  # the disk fills up on every third write
        calls.append(len(data))
        if len(calls) % 3 == 0:
            raise OSError(28, "No space left on device")
        return original(handle, data)

    monkeypatch.setattr(safetensors_io, "_write_all", failing)
    with pytest.raises(OSError, match="No space left"):
        write_merged_model(pool, table, out, progress=False)
    assert len(calls) == 3  # it failed part-way, not before the first tensor
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(OSError, match="No space left"):
        write_merged_model(pool, table, tmp_path / "fresh", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
