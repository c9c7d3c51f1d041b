"""Tied input and output embeddings, and when a merge unties them, as PEFT's does.

A base saved with ``tie_word_embeddings: true`` stores its input embeddings once and
no ``lm_head.weight``. PEFT wraps each ``modules_to_save`` module in a copy of its own,
so an adapter that retrains ``lm_head`` or ``embed_tokens`` of such a base has the two
apart in its own model, and PEFT's ``merge_and_unload`` writes them apart: the head
stored, ``tie_word_embeddings: false``, and the side the adapter did not save left at
the base's values. (Trained with ``ensure_weight_tying: true``, the adapter keeps one
copy for both and PEFT's merge keeps the tie: the head follows the saved embeddings.)
A merge of a pool holding an adapter that unties does the same; then a
full checkpoint that is itself tied moves its head with its embeddings, as it does in
its own model. A pool that moves neither keeps the tie (one tensor written).
"""

from __future__ import annotations

import logging

from mergekit_fw.pool.candidates import Candidate, DenseCandidate, LoraCandidate, SafetensorsIndex

LOG = logging.getLogger(__name__)


def _moves_apart(candidate: Candidate, tied: str, stored: str) -> bool:
    if tied in candidate.tensor_names():  # a saved head, or a checkpoint that stores one
        return True
    if not isinstance(candidate, LoraCandidate) or candidate.config is None:
        return False
    # saved embeddings alone, unless PEFT was told to keep the pair tied (one copy for both)
    return stored in candidate.full and not candidate.config.ensure_weight_tying


def untie_heads(base_config: dict, base_index: SafetensorsIndex, candidates: list[Candidate]) -> dict:
    """List the tied names the pool moves apart among the base's tensors; the base's
    config as the merged model has it (``tie_word_embeddings: false`` once untied)."""
    untied = [
        tied
        for tied, stored in base_index.tied.items()
        if any(_moves_apart(candidate, tied, stored) for candidate in candidates)
    ]
    for tied in untied:
        base_index.untie(tied)
        stored = base_index.tied[tied]
        for candidate in candidates:
            _move_tied_head(candidate, tied, stored)
        LOG.info("the pool moves %s apart from %s: the merge unties them, as PEFT's merge does", tied, stored)
    return {**base_config, "tie_word_embeddings": False} if untied else base_config


def _move_tied_head(candidate: Candidate, tied: str, stored: str) -> None:
    """A candidate whose own model keeps the pair tied moves its head with its
    embeddings: a tied full checkpoint, or an adapter that saves them with
    ``ensure_weight_tying``. Its head's delta is then its embeddings' delta."""
    if isinstance(candidate, DenseCandidate):
        if tied not in candidate.index.tied or stored not in candidate.touched:
            return
        candidate.index.untie(tied)
        candidate.touched.append(tied)
    elif candidate.config is not None and candidate.config.ensure_weight_tying and stored in candidate.full:
        candidate.full[tied] = candidate.full[stored]
    else:
        return
    if stored in candidate.vocab_maps:
        candidate.vocab_maps[tied] = candidate.vocab_maps[stored]
