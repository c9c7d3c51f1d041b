"""The merge written as a PEFT LoRA adapter instead of a model.

Serving one base with many adapters (vLLM, TGI, PEFT's multi-adapter loading) wants a
few megabytes, not a second model. For a module that only LoRAs touch, the merged
delta ``sum_i c_i s_i B_i A_i`` is itself a LoRA: the stacked factors (exact, rank
``sum_i r_i``) or their best rank-R truncation. A module that a full checkpoint (or a
LoRA's ``modules_to_save``, or the initial merge) touches has a dense delta: it is
saved whole as one of the adapter's ``modules_to_save``, which PEFT loads in place of
the base's module. Every scale is folded into ``B`` and each module's ``lora_alpha``
equals its rank, so PEFT's scaling is 1 everywhere.

Written to a hidden sibling folder and renamed into place, like a model output.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mergekit_fw.merge_fn import convex_merge
from mergekit_fw.output.low_rank import stacked, truncated
from mergekit_fw.output.writer import contributors, merged_tensor, replace_folder, sync_tree
from mergekit_fw.pool.adapter_config import CONV1D_MODEL_TYPES, conv1d_layout
from mergekit_fw.pool.candidates import Candidate, LoraCandidate
from mergekit_fw.pool.pool import Pool
from mergekit_fw.solve.table import CoefficientTable

LOG = logging.getLogger(__name__)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # where PEFT's causal-LM wrapper puts the base's module names


@dataclass
class AdapterReport:
    """What the adapter holds: its rank setting, each LoRA module's rank and (when
    truncated) the relative error of its delta, and the modules saved whole."""

    rank: int | None
    ranks: dict[str, int] = field(default_factory=dict)
    relative_error: dict[str, float] = field(default_factory=dict)
    saved_whole: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "format": "peft-lora",
            "rank": self.rank,
            "ranks": self.ranks,
            "relative_error": self.relative_error,
            "max_relative_error": max(self.relative_error.values(), default=0.0),
            "modules_to_save": self.saved_whole,
        }


def _module(tensor: str) -> tuple[str, str]:
    module, _, parameter = tensor.rpartition(".")
    return module, parameter


def _whole_modules(pool: Pool, touched: dict[str, list[tuple[Candidate, float]]], fan_in_fan_out: bool) -> set[str]:
    """Modules whose delta is not a sum of LoRA products in the adapter's layout."""
    whole = set()
    for tensor, present in touched.items():
        module, parameter = _module(tensor)
        low_rank = parameter == "weight" and all(
            isinstance(c, LoraCandidate) and c.is_low_rank(tensor) for c, _ in present
        )
        if not low_rank or conv1d_layout(pool.base_config, tensor) != fan_in_fan_out:
            whole.add(module)
    return whole


def _lora_pair(
    present: list[tuple[Candidate, float]], tensor: str, rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B and A (the base tensor's layout) of the merged delta, and the truncation's error."""
    factors = []
    for candidate, weight in present:
        assert isinstance(candidate, LoraCandidate)
        pair = candidate.factors[tensor]
        fresh = not pair.loaded
        factors.append((pair.B, pair.A, weight * pair.scale))
        if fresh:  # read for this tensor only, as the model writer does
            pair.release()
    B, A = stacked(factors)
    if rank is None or rank >= B.shape[1]:
        return B, A, 0.0
    return truncated(B, A, rank)


def _peft_config(
    base_reference: str,
    ranks: dict[str, int],
    saved_whole: list[str],
    fan_in_fan_out: bool,
    keep_tied: bool = False,
):
    """PEFT's own ``LoraConfig``: the most common rank as ``r``, the others by module
    (exact names, as escaped patterns), ``lora_alpha`` equal to the rank throughout.
    ``keep_tied``: the merge moves embeddings that the base ties to its head and keeps
    the tie, so PEFT must keep it too (else its merge writes the head apart, unmoved)."""
    from peft import LoraConfig

    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {re.escape(module): rank for module, rank in ranks.items() if rank != common}
    return LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(ranks) or None,
        modules_to_save=saved_whole or None,
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_reference,
        task_type="CAUSAL_LM",
        inference_mode=True,
        ensure_weight_tying=keep_tied,
    )


def write_merged_adapter(
    pool: Pool,
    table: CoefficientTable,
    out_path: Path,
    *,
    base_reference: str,
    rank: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    extra_writer: Callable[[Path, AdapterReport], None] | None = None,
) -> AdapterReport:
    """Write the merge as a PEFT adapter folder at ``out_path`` atomically.

    ``rank``: None for the exact adapter, else each LoRA module truncated to at most
    that rank; ``dtype``: of the saved tensors (default float32); ``extra_writer``:
    adds the run's files (card, table, trace, replay) given the report."""
    if table.merge_fn != "convex":
        raise ValueError(
            f"--output-format adapter: merge_fn {table.merge_fn!r} trims and elects signs per entry, so the "
            "merge is not a sum of LoRA products; write a model instead"
        )
    if rank is not None and rank < 1:
        raise ValueError(f"--adapter-rank must be at least 1 (got {rank})")
    dtype = dtype or torch.float32
    out_path = Path(out_path)
    coefficients = table.coefficient_map()
    names = sorted(n for n in pool.base_index.names() if pool.base_index.stored(n).spec.dtype.is_floating_point)
    touched = {n: present for n in names if (present := contributors(pool, coefficients.get(n), n))}
    fan_in_fan_out = pool.base_config.get("model_type") in CONV1D_MODEL_TYPES
    whole = _whole_modules(pool, touched, fan_in_fan_out)
    report = AdapterReport(rank=rank, saved_whole=sorted(whole))
    tensors: dict[str, torch.Tensor] = {}
    for tensor, present in tqdm(list(touched.items()), desc="adapter", disable=not progress):
        module, _ = _module(tensor)
        if module in whole:
            continue
        B, A, error = _lora_pair(present, tensor, rank)
        if fan_in_fan_out:  # the base stores (in x out); PEFT's pair is that of the transpose
            B, A = A.T, B.T
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.to(dtype).contiguous()
        report.ranks[module] = int(A.shape[0])
        if rank is not None:
            report.relative_error[tensor] = error
    for module in report.saved_whole:  # every parameter of the module, as PEFT replaces it whole
        for tensor in (n for n in names if _module(n)[0] == module):
            base = pool.base_index.get(tensor)
            merged = merged_tensor(pool, coefficients.get(tensor), tensor, base, convex_merge)
            tensors[f"{PREFIX}{tensor}"] = merged.to(dtype).contiguous()
    # a tied pair the merge moves and keeps tied: PEFT saves (and loads) the one copy under both names
    kept_tied = {
        tied: stored
        for tied, stored in pool.base_index.tied.items()
        if tied not in pool.base_index.untied and f"{PREFIX}{stored}" in tensors
    }
    for tied, stored in kept_tied.items():
        tensors[f"{PREFIX}{tied}"] = tensors[f"{PREFIX}{stored}"].clone()
    if not report.ranks:  # PEFT loads no adapter without a LoRA module
        why = (
            f"every module it moves has a dense delta ({len(report.saved_whole)} modules, from full checkpoints, "
            "modules_to_save or the initial merge), so the adapter would be the model saved whole"
            if report.saved_whole
            else "the table gives no candidate any weight"
        )
        raise ValueError(f"--output-format adapter: {why}; write a model instead")
    tmp = out_path.parent / f".{out_path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = _peft_config(base_reference, report.ranks, report.saved_whole, fan_in_fan_out, bool(kept_tied))
        config.save_pretrained(str(tmp))
        if extra_writer is not None:
            extra_writer(tmp, report)
        sync_tree(tmp)
        replace_folder(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    LOG.info(
        "wrote a PEFT adapter to %s: %d LoRA modules (ranks %s), %d modules saved whole",
        out_path,
        len(report.ranks),
        sorted(set(report.ranks.values())),
        len(report.saved_whole),
    )
    return report
