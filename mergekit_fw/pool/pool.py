"""The opened pool: the base and its candidates, resolved and structurally checked.

A candidate is a PEFT LoRA adapter (``BASE+ADAPTER`` in mergekit's notation) or a
full checkpoint folder. Everything is resolved to local folders first, then checked
to fit the base: same architecture, same tensor shapes, LoRA deltas that land on
real base weights. Task vectors are served lazily, one tensor at a time; only the
adapters' own low-rank factors are kept resident."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mergekit_fw.pool.candidates import (
    Candidate,
    DenseCandidate,
    LoraCandidate,
    SafetensorsIndex,
    load_dense,
    load_lora,
    read_model_config,
    tie_head,
)
from mergekit_fw.pool.pickled import PickleRefused
from mergekit_fw.pool.pickled import pickle_free as _pickle_free
from mergekit_fw.pool.references import (
    CandidateSpec,
    ModelSource,
    PoolError,
    PoolSpec,
    check_pool_spec,
    local_dir,
)
from mergekit_fw.pool.remote_code import download_patterns, refuse_remote_code
from mergekit_fw.pool.tied import untie_heads

LOG = logging.getLogger(__name__)


@dataclass
class Pool:
    base_dir: Path
    base_config: dict  # as the merged model has it (untied by :func:`.tied.untie_heads` where the pool unties)
    base_index: SafetensorsIndex
    candidates: list[Candidate]
    trust_remote_code: bool = False  # the oracle's model and tokenizer may run their repository's code

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.candidates]

    def tensor_names(self) -> list[str]:
        """Tensors that some candidate moves, in the base checkpoint's order."""
        moved = set()
        for candidate in self.candidates:
            moved.update(candidate.tensor_names())
        return [name for name in self.base_index.names() if name in moved]

    def lora_candidates(self) -> list[tuple[int, LoraCandidate]]:
        return [(i, c) for i, c in enumerate(self.candidates) if isinstance(c, LoraCandidate)]

    def dense_candidates(self) -> list[tuple[int, DenseCandidate]]:
        return [(i, c) for i, c in enumerate(self.candidates) if isinstance(c, DenseCandidate)]

    def with_candidate(self, candidate: Candidate) -> Pool:
        """This pool plus one more vertex (the initial merge), checked like the others."""
        if candidate.name in self.names:
            raise PoolError(f"candidate {candidate.name} is already in the pool")
        return Pool(
            self.base_dir, self.base_config, self.base_index, [*self.candidates, candidate], self.trust_remote_code
        )

    def files(self) -> list[Path]:
        out = [self.base_dir / "config.json", *self.base_index.weight_files()]
        for candidate in self.candidates:
            out.extend(candidate.files())
        return out


def pickle_free(folder: Path, what: str, convert_to: Path | None) -> Path:
    try:
        return _pickle_free(folder, what, convert_to)
    except PickleRefused as error:
        raise PoolError(str(error)) from None


def fetched(source: ModelSource, spec: PoolSpec, what: str) -> Path:
    """The reference's local folder (what a merge reads, from the hub when it is an
    id), refused if it asks to run its own code and the user did not trust it."""
    folder = local_dir(source, what, patterns=download_patterns(spec.trust_remote_code))
    refuse_remote_code(folder, what, trusted=spec.trust_remote_code)
    return folder


def open_base(spec: PoolSpec, *, pickles_to: Path | None = None) -> tuple[Path, dict, SafetensorsIndex]:
    """The base's folder, config and tensor index; a :class:`PoolError` if unusable."""
    base_dir = fetched(spec.base, spec, "base_model")
    base_dir = pickle_free(base_dir, "base_model", pickles_to)
    base_config = read_model_config(base_dir, "base_model")
    base_index = SafetensorsIndex(base_dir, "base_model")
    tie_head(base_config, base_index)
    return base_dir, base_config, base_index


def load_candidate(
    candidate: CandidateSpec,
    spec: PoolSpec,
    base_dir: Path,
    base_config: dict,
    base_index: SafetensorsIndex,
    *,
    pickles_to: Path | None = None,
) -> Candidate:
    """One candidate, checked against the base; a :class:`PoolError` names the misfit."""
    if candidate.lora is not None:
        if candidate.model != spec.base:
            raise PoolError(
                f"candidate {candidate.name}: its LoRA is applied to {candidate.model}, "
                f"but base_model is {spec.base}; Frank-Wolfe needs every adapter on the base"
            )
        adapter_dir = fetched(candidate.lora, spec, f"candidate {candidate.name}: adapter")
        adapter_dir = pickle_free(adapter_dir, f"candidate {candidate.name}:", pickles_to)
        return load_lora(candidate.name, adapter_dir, base_config, base_index, base_dir if spec.align_vocab else None)
    folder = fetched(candidate.model, spec, f"candidate {candidate.name}:")
    if folder == base_dir:
        raise PoolError(f"candidate {candidate.name}: is the base model itself (its task vector is zero)")
    folder = pickle_free(folder, f"candidate {candidate.name}:", pickles_to)
    return load_dense(candidate.name, folder, base_config, base_index, base_dir if spec.align_vocab else None)


def open_pool(spec: PoolSpec, *, pickles_to: Path | None = None) -> Pool:
    """Resolve and check the whole pool's structure; raise :class:`PoolError` on the first misfit.

    (The numeric checks, NaN/Inf and outliers, are :mod:`mergekit_fw.pool.validate`'s.)"""
    check_pool_spec(spec)
    base_dir, base_config, base_index = open_base(spec, pickles_to=pickles_to)
    candidates = [
        load_candidate(c, spec, base_dir, base_config, base_index, pickles_to=pickles_to) for c in spec.candidates
    ]
    pool = Pool(
        base_dir=base_dir,
        base_config=untie_heads(base_config, base_index, candidates),
        base_index=base_index,
        candidates=candidates,
        trust_remote_code=spec.trust_remote_code,
    )
    LOG.info(
        "pool: base %s, %d LoRA and %d dense candidates, %d tensors moved",
        base_dir,
        len(pool.lora_candidates()),
        len(pool.dense_candidates()),
        len(pool.tensor_names()),
    )
    return pool
