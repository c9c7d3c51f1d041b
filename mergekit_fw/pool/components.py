"""A LoRA adapter's rank-1 components as candidates of their own (``granularity: rank_component``).

An adapter's delta on a module is ``s B A = sum_j s b_j a_j^T``, one term per column
of ``B`` and row of ``A``. With one coefficient per adapter and tensor (the paper), a
merge can only take all of an adapter's directions on a tensor or none of them, and
when many tasks are asked the directions that help one task and hurt another are
kept or dropped together. Split into components, each direction gets its own
coefficient, and the merge ``sum_j c_j s b_j a_j^T = B diag(c s) A`` is still one
LoRA pair of the same rank: the solver, the constraint sets, the oracle's gates,
the writers and the adapter output need nothing new, because each component is an
ordinary low-rank candidate of rank 1.

The components are those of the adapter's own factorisation (the columns PEFT
trained), not of an SVD of ``B A``. A LoRA's ``modules_to_save`` (tensors it saves
whole) are a dense delta with no rank structure: they stay one candidate of their
own, ``NAME#full``. Full checkpoints stay whole.

Nothing is copied when the pool is split: a component reads its row of ``A`` and
column of ``B`` from the adapter's file when first asked (the oracle then points it
at its slice of the module's bank, as it does whole adapters' factors).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from safetensors import safe_open

from mergekit_fw.pool.candidates import Candidate, LoraCandidate, LoraFactors
from mergekit_fw.pool.pool import Pool

SEPARATOR = "#"
FULL = "full"  # the suffix of the candidate holding a LoRA's modules_to_save


def component_name(candidate: str, index: int) -> str:
    return f"{candidate}{SEPARATOR}r{index}"


def parent_name(name: str) -> str:
    """The candidate a component (or a ``#full`` part) came from; other names as they are."""
    head, sep, tail = name.rpartition(SEPARATOR)
    if sep and (tail == FULL or (tail.startswith("r") and tail[1:].isdigit())):
        return head
    return name


class RankComponent(LoraFactors):
    """``s b_j a_j^T``: the ``index``-th rank-1 term of an adapter's factors on one module."""

    def __init__(self, whole: LoraFactors, index: int):
        if not 0 <= index < whole.rank:
            raise ValueError(f"rank component {index} of a rank-{whole.rank} factor pair")
        super().__init__(whole.source, whole.key_A, whole.key_B, whole.scale, 1, whole.shape, whole.transpose)
        self.index = index

    def _load(self) -> None:
        """Row j of A and column j of B through safetensors' slices, not the whole pair
        (the oracle fills its bank component by component); copied into storage of their
        own, so nothing keeps a larger buffer alive beside the bank."""
        j = self.index
        with safe_open(str(self.source), framework="pt") as handle:
            if self.transpose:  # fan_in_fan_out: A is the transpose of lora_B, B of lora_A
                A = handle.get_slice(self.key_B)[:, j : j + 1].T
                B = handle.get_slice(self.key_A)[j : j + 1].T
            else:
                A = handle.get_slice(self.key_A)[j : j + 1]
                B = handle.get_slice(self.key_B)[:, j : j + 1]
        self._A, self._B = A.to(torch.float32).clone(), B.to(torch.float32).clone()


def split_candidate(candidate: LoraCandidate) -> list[LoraCandidate]:
    """The adapter's components, component ``j`` on every module whose rank exceeds
    ``j`` (a ``rank_pattern`` can give modules different ranks), then its
    ``modules_to_save`` as one dense candidate."""
    rank = max((f.rank for f in candidate.factors.values()), default=0)
    parts = [
        replace(
            candidate,
            name=component_name(candidate.name, j),
            factors={t: RankComponent(f, j) for t, f in candidate.factors.items() if j < f.rank},
            full={},
            vocab_maps={},
        )
        for j in range(rank)
    ]
    if candidate.full:
        parts.append(replace(candidate, name=f"{candidate.name}{SEPARATOR}{FULL}", factors={}))
    return parts


def split_rank_components(pool: Pool) -> Pool:
    """The pool with every LoRA adapter replaced by its rank-1 components, in place
    (an adapter's components stay together, in the pool's order)."""
    candidates: list[Candidate] = []
    for candidate in pool.candidates:
        candidates.extend(split_candidate(candidate) if isinstance(candidate, LoraCandidate) else [candidate])
    return replace(pool, candidates=candidates)
