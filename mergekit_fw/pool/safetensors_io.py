"""Streaming sharded safetensors: written tensor by tensor, laid out up front.

mergekit's ``TensorWriter`` holds a whole shard in memory, hands it to
``safetensors.save_file`` (which serialises it into one more buffer) and only
learns the shard count at the end, renaming every file afterwards. Our output's
names, shapes and dtypes are all known before the first byte is written (they
are the base's), so each shard's header can be written first and the tensors
streamed after it: peak memory is one tensor, and a tensor the merge does not
touch is copied file to file by the kernel without entering Python at all.

The files are ordinary safetensors with mergekit's names
(``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json``) and the same shard boundaries mergekit's
writer would choose for the same tensors in the same order.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

MERGEKIT_VERSION = "0.1.5"  # what mergekit's writer records in the index metadata

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_COPY_CHUNK = 64 * 1024 * 1024


class SafetensorsFormatError(ValueError):
    """A file that is not a readable safetensors file (truncated, bad header)."""


@dataclass(frozen=True)
class TensorSpec:
    """What one output tensor will be, known before it is computed."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes sit inside a safetensors file."""

    path: Path
    spec: TensorSpec
    offset: int  # absolute, from the start of the file
    nbytes: int


def read_layout(path: Path) -> dict[str, StoredTensor]:
    """Parse a safetensors header: name -> dtype, shape and byte range.

    Checks what a truncated download breaks (the header length, the data
    extent against the file size) so the caller can name the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise SafetensorsFormatError(f"{path}: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise SafetensorsFormatError(
                f"{path}: header claims {header_len} bytes but the file has {size} (truncated?)"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SafetensorsFormatError(f"{path}: unreadable safetensors header ({error})") from None
    data_start = 8 + header_len
    layout: dict[str, StoredTensor] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        begin, stop = entry["data_offsets"]
        spec = TensorSpec(name, dtype, tuple(entry["shape"]))
        if stop - begin != spec.nbytes:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} spans {stop - begin} bytes, its shape needs {spec.nbytes}"
            )
        layout[name] = StoredTensor(path, spec, data_start + begin, stop - begin)
        end = max(end, stop)
    if data_start + end > size:
        raise SafetensorsFormatError(
            f"{path}: data ends at byte {data_start + end} but the file has {size} (truncated)"
        )
    return layout


def plan_shards(specs: Iterable[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """mergekit's rule: start a new shard when the next tensor would overflow a
    non-empty one (a tensor bigger than the limit gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and max_shard_size > 0 and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [shard for shard in shards if shard]


def shard_names(count: int, prefix: str = "model", extension: str = "safetensors") -> list[str]:
    if count == 1:
        return [f"{prefix}.{extension}"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.{extension}" for i in range(count)]


def _header_bytes(shard: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in shard:
        header[spec.name] = {
            "dtype": _NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(text)) + text


def _write_all(handle: BinaryIO, data: memoryview) -> None:
    while len(data):
        written = handle.write(data)
        data = data[written:]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer


class ShardedSafetensorsWriter:
    """Writes ``specs`` in order into mergekit-named shards under ``folder``.

    Every tensor is checked against its spec as it arrives, so a shard's
    header can never disagree with its data. ``finalize`` fsyncs every file.
    """

    def __init__(
        self, folder: Path, specs: list[TensorSpec], max_shard_size: int, metadata: dict[str, str] | None = None
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(specs, max_shard_size)
        self.names = shard_names(len(self.shards))
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._open_shard: int | None = None
        self._handle: BinaryIO | None = None

    def _expect(self, name: str) -> TensorSpec:
        if self._next >= len(self._queue):
            raise ValueError(f"{self.folder}: tensor {name!r} was not planned (all tensors are written)")
        shard, spec = self._queue[self._next]
        if spec.name != name:
            raise ValueError(f"{self.folder}: expected tensor {spec.name!r} next, got {name!r}")
        if self._open_shard != shard:
            self._close_shard()
            self._handle = open(self.folder / self.names[shard], "wb", buffering=0)
            _write_all(self._handle, memoryview(_header_bytes(self.shards[shard], self.metadata)))
            self._open_shard = shard
        self._next += 1
        return spec

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._expect(name)
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"{self.folder}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, planned {spec.dtype} {spec.shape}"
            )
        _write_all(self._handle, _tensor_bytes(tensor.cpu()))  # type: ignore[arg-type]

    def write_blocks(self, name: str, blocks: Iterable[torch.Tensor]) -> None:
        """Write a tensor as consecutive row blocks (never whole in memory)."""
        spec = self._expect(name)
        if not spec.shape:
            raise ValueError(f"{self.folder}: tensor {name!r} is a scalar, it has no rows to stream")
        rows = 0
        for block in blocks:
            if block.dtype != spec.dtype or tuple(block.shape[1:]) != spec.shape[1:] or block.dim() != len(spec.shape):
                raise ValueError(
                    f"{self.folder}: a block of {name!r} is {block.dtype} {tuple(block.shape)}, planned {spec.dtype} {spec.shape}"
                )
            rows += block.shape[0]
            _write_all(self._handle, _tensor_bytes(block.cpu()))  # type: ignore[arg-type]
        if rows != spec.shape[0]:
            raise ValueError(f"{self.folder}: tensor {name!r} got {rows} rows, planned {spec.shape}")

    def copy(self, name: str, source: StoredTensor) -> None:
        """Copy a stored tensor's bytes unchanged (kernel-side where possible)."""
        spec = self._expect(name)
        if source.spec.dtype != spec.dtype or source.spec.shape != spec.shape:
            raise ValueError(f"{self.folder}: stored tensor {name!r} in {source.path} does not match its plan")
        with open(source.path, "rb", buffering=0) as src:
            _copy_range(src, self._handle, source.offset, source.nbytes)  # type: ignore[arg-type]

    def _close_shard(self) -> None:
        if self._handle is not None:
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def finalize(self) -> None:
        if self._next != len(self._queue):
            missing = [spec.name for _, spec in self._queue[self._next :]]
            raise ValueError(f"{self.folder}: {len(missing)} planned tensors were never written, first {missing[0]!r}")
        self._close_shard()
        if len(self.shards) > 1:
            index = {
                "metadata": {
                    "total_size": sum(s.nbytes for shard in self.shards for s in shard),
                    "mergekit_version": MERGEKIT_VERSION,
                },
                "weight_map": {spec.name: self.names[i] for i, shard in enumerate(self.shards) for spec in shard},
            }
            index_path = self.folder / "model.safetensors.index.json"
            with open(index_path, "w", encoding="utf-8") as handle:
                json.dump(index, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, count: int) -> None:
    try:
        while count:
            copied = os.copy_file_range(src.fileno(), dst.fileno(), count, offset)
            if copied == 0:
                raise SafetensorsFormatError(f"{src.name}: ended {count} bytes early (truncated)")
            offset += copied
            count -= copied
        return
    except (AttributeError, OSError):  # no copy_file_range here (or across these filesystems)
        pass
    while count:
        chunk = os.pread(src.fileno(), min(count, _COPY_CHUNK), offset)
        if not chunk:
            raise SafetensorsFormatError(f"{src.name}: ended {count} bytes early (truncated)")
        _write_all(dst, memoryview(chunk))
        offset += len(chunk)
        count -= len(chunk)


def fsync_folder(folder: Path) -> None:
    """Make the folder's entries (new files, renames) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
