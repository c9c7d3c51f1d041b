"""The fast path's output: merged weights without expanding any LoRA to a model.

Goes through the base one tensor at a time. A tensor no candidate touches is
copied byte for byte from the base file (kernel-side); a touched one is
computed and written in row blocks of a few MiB (:func:`convex_blocks`).
Shards are laid out up front (:mod:`mergekit_fw.pool.safetensors_io`, mergekit's
names and shard boundaries), so peak memory is one row block plus the stacked
LoRA factors of one tensor, not a shard or a model. Everything goes to a temporary sibling folder,
fsynced and renamed into place only when complete: ``out/`` is never
half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mergekit_fw.merge_fn import (
    MergeFunction,
    TiesKernel,
    compute_dtype,
    convex_merge,
    merge_function,
    single_vertex,
)
from mergekit_fw.pool.candidates import Candidate, DenseCandidate, LoraCandidate
from mergekit_fw.pool.pool import Pool
from mergekit_fw.pool.rows import row_blocks, stored_rows, value_rows
from mergekit_fw.pool.safetensors_io import (
    ShardedSafetensorsWriter,
    StoredTensor,
    TensorSpec,
    fsync_folder,
)
from mergekit_fw.solve.table import CoefficientTable

LOG = logging.getLogger(__name__)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def contributors(pool: Pool, weights: dict[str, float] | None, name: str) -> list[tuple[Candidate, float]]:
    """The candidates with a non-zero weight on ``name`` that have a delta there."""
    if not weights:
        return []
    return [
        (c, weights[c.name]) for c in pool.candidates if weights.get(c.name, 0.0) != 0.0 and name in c.tensor_names()
    ]


def _stored_vertex(present: list[tuple[Candidate, float]], merge: MergeFunction, name: str) -> DenseCandidate | None:
    """Under ``convex``, the dense candidate holding all the weight (its stored tensor is the
    output, unless it has to be aligned to the base's vocabulary first)."""
    if merge is not convex_merge:
        return None
    only = single_vertex([weight for _, weight in present])
    if only is None:
        return None
    candidate = present[only][0]
    if not isinstance(candidate, DenseCandidate) or name in candidate.vocab_maps:
        return None
    return candidate


def _deltas(present: list[tuple[Candidate, float]], name: str, base: torch.Tensor) -> list[torch.Tensor]:
    deltas = [c.delta(name, base) for c, _ in present]
    missing = [c.name for (c, _), d in zip(present, deltas) if d is None]
    if missing:  # contributors() keeps only candidates that move ``name``
        raise ValueError(f"{name}: no delta from {', '.join(missing)}")
    return [d for d in deltas if d is not None]


def convex_blocks(pool: Pool, name: str, present: list[tuple[Candidate, float]]) -> Iterator[torch.Tensor]:
    """Row blocks of ``base + sum_i c_i delta_i`` in the compute dtype.

    All LoRAs go through one GEMM over stacked factors per block,
    ``[c_1 s_1 B_1 | ... | c_n s_n B_n][rows] @ [A_1; ...; A_n]``; full
    checkpoints' rows are read and subtracted block by block. A block is a
    few MiB, so neither the base tensor nor any delta is ever whole in memory.
    """
    shape = pool.base_index.shape(name)
    if not shape:  # a scalar: nothing to stream
        base = pool.base_index.get(name)
        yield convex_merge(name, base.to(compute_dtype(base)), _deltas(present, name, base), [w for _, w in present])
        return
    dtype = compute_dtype(torch.empty((), dtype=pool.base_index.stored(name).spec.dtype))
    loras = [(c.factors[name], weight) for c, weight in present if isinstance(c, LoraCandidate) and c.is_low_rank(name)]
    B = A = None
    if loras:
        fresh = [factors for factors, _ in loras if not factors.loaded]
        B = torch.cat([f.B.to(dtype) * (weight * f.scale) for f, weight in loras], dim=1)
        A = torch.cat([f.A.to(dtype) for f, _ in loras], dim=0)
        for factors in fresh:  # read for this tensor only: the pool's factors do not stay resident
            factors.release()
    with ExitStack() as stack:
        base_rows = stack.enter_context(stored_rows(pool.base_index, name))
        dense = [
            (stack.enter_context(value_rows(c, name, base_rows)), w) for c, w in present if not c.is_low_rank(name)
        ]
        for start, stop in row_blocks(shape):
            base = base_rows(start, stop).to(dtype)
            merged = base.clone()
            if B is not None and A is not None:
                merged.addmm_(B[start:stop], A)
            for rows, weight in dense:
                merged.add_(rows(start, stop).to(dtype) - base, alpha=weight)
            yield merged


def merged_tensor(
    pool: Pool, weights: dict[str, float] | None, name: str, base: torch.Tensor, merge: MergeFunction
) -> torch.Tensor:
    """One whole output tensor: ``merge`` over the candidates with non-zero weight."""
    present = contributors(pool, weights, name) if base.is_floating_point() else []
    if not present:
        return base
    vertex = _stored_vertex(present, merge, name)
    if vertex is not None:
        return vertex.index.get(name)  # exactly the stored vertex
    if merge is convex_merge:
        if base.dim() == 0:
            return next(convex_blocks(pool, name, present))
        # filled in place: a list of blocks and their concatenation would hold it twice
        merged = torch.empty(base.shape, dtype=compute_dtype(base))
        start = 0
        for block in convex_blocks(pool, name, present):
            merged[start : start + block.shape[0]] = block
            start += block.shape[0]
        return merged
    dtype = compute_dtype(base)
    deltas = [delta.to(dtype) for delta in _deltas(present, name, base)]
    return merge(name, base.to(dtype), deltas, [weight for _, weight in present])


def _output_spec(stored: StoredTensor, dtype: torch.dtype | None) -> TensorSpec:
    floating = stored.spec.dtype.is_floating_point
    return TensorSpec(
        stored.spec.name, dtype if dtype is not None and floating else stored.spec.dtype, stored.spec.shape
    )


def _unchanged_source(
    pool: Pool, present: list[tuple[Candidate, float]], merge: MergeFunction, name: str
) -> StoredTensor | None:
    """The stored tensor an output equals bit for bit, if there is one."""
    if not present:
        return pool.base_index.stored(name)
    vertex = _stored_vertex(present, merge, name)
    return vertex.index.stored(name) if vertex is not None else None


def write_order(names: list[str]) -> list[str]:
    """The order mergekit's executor writes tensors in, so that shard boundaries and
    every file are byte for byte those of ``mergekit-yaml``: it schedules by a
    lexicographic topological sort keyed on each task's group label, which for a
    tensor is its name. The base's own index order (layer by layer in many hub
    checkpoints) would put other tensors in each shard once there is more than one."""
    return sorted(names)


def write_merged_model(
    pool: Pool,
    table: CoefficientTable,
    out_path: Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int = 5 * 1000**3,
    progress: bool = True,
    extra_writer: Callable[[Path], None] | None = None,
    ties: TiesKernel | None = None,
) -> None:
    """Write the merge to ``out_path`` atomically; ``extra_writer(folder)`` adds files.
    ``ties``: mergekit's TIES kernel, for a table solved with ``merge_fn: ties``."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    coefficients = table.coefficient_map()
    merge = merge_function(table.merge_fn, table.density, ties=ties)
    names = write_order(pool.base_index.names())
    specs = [_output_spec(pool.base_index.stored(name), dtype) for name in names]
    writer = ShardedSafetensorsWriter(tmp, specs, max_shard_size)
    try:
        for name, spec in tqdm(list(zip(names, specs)), desc="writing", disable=not progress):
            present = contributors(pool, coefficients.get(name), name) if spec.dtype.is_floating_point else []
            source = _unchanged_source(pool, present, merge, name)
            if source is not None and source.spec.dtype == spec.dtype:
                writer.copy(name, source)
                continue
            if merge is convex_merge and spec.shape and _stored_vertex(present, merge, name) is None:
                writer.write_blocks(name, (block.to(spec.dtype) for block in convex_blocks(pool, name, present)))
                continue
            base = pool.base_index.get(name)
            writer.write(name, merged_tensor(pool, coefficients.get(name), name, base, merge).to(spec.dtype))
        writer.finalize()
        floating = [spec.dtype for spec in specs if spec.dtype.is_floating_point]
        _copy_side_files(pool.base_dir, tmp, floating[0] if floating else None, untied=bool(pool.base_index.untied))
        if extra_writer is not None:
            extra_writer(tmp)
        sync_tree(tmp)
        replace_folder(tmp, out_path)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    LOG.info("wrote merged model to %s", out_path)


class OutputBusy(OSError):
    """Another run holds the output folder's lock."""


@contextmanager
def output_lock(out_path: Path, *, overwrite: bool) -> Iterator[None]:
    """Hold ``out_path`` for one run: a second run on it fails at once, and an
    existing folder is only replaced when the user asked for it."""
    import fcntl

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_path.parent / f".{out_path.name}.lock"
    handle = open(lock_path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OutputBusy(f"{out_path}: another run is writing it (lock {lock_path} is held)") from None
    try:
        if out_path.exists() and not overwrite:
            raise FileExistsError(
                f"{out_path}: already exists; pass --overwrite to replace it (the old folder stays until "
                "the new one is complete)"
            )
        for stale in out_path.parent.glob(f".{out_path.name}.partial-*"):  # left by a killed run; we hold the lock
            LOG.warning("removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        handle.close()


def _copy_side_files(base_dir: Path, target: Path, dtype: torch.dtype | None, *, untied: bool = False) -> None:
    for item in base_dir.iterdir():
        if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name != "config.json":
            shutil.copy2(item, target / item.name)
    config = json.loads((base_dir / "config.json").read_text())
    if untied:  # lm_head.weight is written apart from the embeddings (mergekit_fw.pool.tied)
        config["tie_word_embeddings"] = False
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    (target / "config.json").write_text(json.dumps(config, indent=2))


def replace_folder(tmp: Path, out_path: Path) -> None:
    if out_path.exists():
        old = out_path.parent / f".{out_path.name}.old-{os.getpid()}"
        os.replace(out_path, old)
        os.replace(tmp, out_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_path)
    fsync_folder(out_path.parent)


def sync_tree(folder: Path) -> None:
    """fsync every file and the folder itself, so the rename publishes complete data."""
    for item in folder.iterdir():
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_folder(folder)
