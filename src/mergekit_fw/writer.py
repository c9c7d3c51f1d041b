"""The fast path's output: merged weights without expanding any LoRA to a model.

Reads one base tensor at a time, adds the candidates' weighted deltas (low-rank
products for adapters, streamed tensors for full checkpoints) and hands it to
mergekit's own sharded writer. Everything goes to a temporary sibling folder that
is renamed into place only when complete, so ``out/`` is never half-written.
"""

from __future__ import annotations

import logging
import os
import shutil
import json
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm.auto import tqdm

from mergekit_fw.merge_fn import MergeFunction, compute_dtype, convex_merge, merge_function, single_vertex
from mergekit_fw.mergekit_adapter import tensor_writer
from mergekit_fw.pool import Pool
from mergekit_fw.table import CoefficientTable

LOG = logging.getLogger(__name__)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def merged_tensor(pool: Pool, weights: Optional[Dict[str, float]], name: str, base: torch.Tensor, merge: MergeFunction) -> torch.Tensor:
    """One output tensor: ``merge`` over the candidates with non-zero weight."""
    if not weights or not base.is_floating_point():
        return base
    present = [c for c in pool.candidates if weights.get(c.name, 0.0) != 0.0 and name in c.tensor_names()]
    if not present:
        return base
    only = single_vertex([weights[c.name] for c in present]) if merge is convex_merge else None
    if only is not None and present[only].kind == "dense":
        return present[only].index.get(name)  # exactly the stored vertex
    dtype = compute_dtype(base)
    deltas = [c.delta(name, base).to(dtype) for c in present]
    return merge(name, base.to(dtype), deltas, [weights[c.name] for c in present])


def write_merged_model(
    pool: Pool,
    table: CoefficientTable,
    out_path: Path,
    *,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: int = 5 * 1000**3,
    progress: bool = True,
    extra_writer=None,
) -> None:
    """Write the merge to ``out_path`` atomically; ``extra_writer(folder)`` adds files."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    coefficients = table.coefficient_map()
    merge = merge_function(table.merge_fn, table.density)
    try:
        writer = tensor_writer(tmp, max_shard_size)
        names = pool.base_index.names()
        out_dtype = None
        for name in tqdm(names, desc="writing", disable=not progress):
            base = pool.base_index.get(name)
            tensor = merged_tensor(pool, coefficients.get(name), name, base, merge)
            if tensor.is_floating_point():
                out_dtype = dtype or base.dtype
                tensor = tensor.to(out_dtype)
            writer.save_tensor(name, tensor.contiguous())
        writer.finalize()
        _copy_side_files(pool.base_dir, tmp, out_dtype)
        if extra_writer is not None:
            extra_writer(tmp)
        _replace_folder(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    LOG.info("wrote merged model to %s", out_path)


def _copy_side_files(base_dir: Path, target: Path, dtype: Optional[torch.dtype]) -> None:
    for item in base_dir.iterdir():
        if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name != "config.json":
            shutil.copy2(item, target / item.name)
    config = json.loads((base_dir / "config.json").read_text())
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    (target / "config.json").write_text(json.dumps(config, indent=2))


def _replace_folder(tmp: Path, out_path: Path) -> None:
    if out_path.exists():
        old = out_path.parent / f".{out_path.name}.old-{os.getpid()}"
        os.replace(out_path, old)
        os.replace(tmp, out_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_path)
