"""The streaming shard writer against mergekit's own writer and safetensors' reader."""

import json
import os

import pytest
import torch
from mergekit.io.tensor_writer import TensorWriter
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_fw.pool.safetensors_io import (
    SafetensorsFormatError,
    ShardedSafetensorsWriter,
    TensorSpec,
    read_layout,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(40, 8, generator=g).to(torch.bfloat16),
        "layer.0.weight": torch.randn(8, 8, generator=g),
        "layer.0.bias": torch.randn(8, generator=g).to(torch.float16),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "head.weight": torch.randn(40, 8, generator=g),
    }


def _specs(tensors):
    return [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def _read_all(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.mark.parametrize("max_shard_size", [0, 10**9, 700, 300, 1])
def test_same_names_shards_and_index_as_mergekit(tmp_path, max_shard_size):
    tensors = _tensors()
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    writer = ShardedSafetensorsWriter(ours, _specs(tensors), max_shard_size)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.finalize()
    reference = TensorWriter(str(theirs), max_shard_size=max_shard_size, safe_serialization=True)
    for name, tensor in tensors.items():
        reference.save_tensor(name, tensor)
    reference.finalize()

    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
    if (theirs / "model.safetensors.index.json").exists():
        assert json.loads((ours / "model.safetensors.index.json").read_text()) == json.loads(
            (theirs / "model.safetensors.index.json").read_text()
        )
    got, expected = _read_all(ours), _read_all(theirs)
    assert got.keys() == tensors.keys()
    for name in tensors:
        assert got[name].dtype == tensors[name].dtype
        assert torch.equal(got[name], tensors[name]) and torch.equal(expected[name], got[name])
    for shard in ours.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_moves_stored_bytes_unchanged(tmp_path, monkeypatch, kernel_copy):
    tensors = _tensors()
    source = tmp_path / "source.safetensors"
    save_file(tensors, str(source))
    if not kernel_copy:  # the read/write fallback for filesystems without copy_file_range
        def refuse(*args):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    layout = read_layout(source)
    writer = ShardedSafetensorsWriter(tmp_path / "out", _specs(tensors), 0)
    for name in tensors:
        writer.copy(name, layout[name])
    writer.finalize()
    raw = source.read_bytes()
    out_layout = read_layout(tmp_path / "out" / "model.safetensors")
    out_raw = (tmp_path / "out" / "model.safetensors").read_bytes()
    for name, stored in layout.items():
        mine = out_layout[name]
        assert out_raw[mine.offset : mine.offset + mine.nbytes] == raw[stored.offset : stored.offset + stored.nbytes]
    got = _read_all(tmp_path / "out")
    assert all(torch.equal(got[n], tensors[n]) for n in tensors)


def test_writer_refuses_what_breaks_the_plan(tmp_path):
    tensors = _tensors()
    writer = ShardedSafetensorsWriter(tmp_path / "a", _specs(tensors), 0)
    with pytest.raises(ValueError, match="expected tensor 'embed.weight' next"):
        writer.write("head.weight", tensors["head.weight"])
    with pytest.raises(ValueError, match="planned torch.bfloat16"):
        writer.write("embed.weight", tensors["embed.weight"].float())
    writer.abort()
    writer = ShardedSafetensorsWriter(tmp_path / "b", _specs(tensors), 0)
    writer.write("embed.weight", tensors["embed.weight"])
    with pytest.raises(ValueError, match="never written, first 'layer.0.weight'"):
        writer.finalize()
    writer.abort()


def test_read_layout_names_a_truncated_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    assert set(read_layout(path)) == set(_tensors())
    for cut, message in ((len(data) - 5, "truncated"), (4, "too short"), (20, "header claims")):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        with pytest.raises(SafetensorsFormatError, match=message) as error:
            read_layout(broken)
        assert str(broken) in str(error.value)
