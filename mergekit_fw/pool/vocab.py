"""Candidates with another vocabulary, aligned to the base's (``tokenizer_source: base``).

A community fine-tune that added tokens (special tokens, a chat template's markers)
has taller embedding and head matrices than the base. With ``tokenizer_source: base``
mergekit keeps the base's tokenizer and permutes every model's rows into it; the
Frank-Wolfe pool does the same, by token string: the base's token ``t`` takes the
candidate's row for ``t``; a base token the candidate lacks keeps the base's row (a
zero delta there); the candidate's extra tokens are dropped, since the merged model
speaks the base's vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch


class VocabularyError(ValueError):
    pass


def _vocab(folder: Path, what: str) -> dict:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    except Exception as error:  # no tokenizer files, or unreadable ones
        raise VocabularyError(
            f"{what} {folder}: its vocabulary differs from the base's and it has no readable tokenizer to align "
            f"it by ({type(error).__name__}: {str(error)[:200]})"
        ) from None


def vocab_map(base_dir: Path, folder: Path, what: str) -> torch.Tensor:
    """For each base token id, the candidate's id of the same token, or -1."""
    base, other = _vocab(base_dir, "base_model"), _vocab(folder, what)
    index = torch.full((max(base.values()) + 1,), -1, dtype=torch.long)
    for token, base_id in base.items():
        index[base_id] = other.get(token, -1)
    return index


def align_rows(value: torch.Tensor, index: torch.Tensor, base_rows: torch.Tensor) -> torch.Tensor:
    """Rows of ``value`` picked by ``index`` (one per base row); -1 takes the base's row."""
    if index.shape[0] != base_rows.shape[0]:
        raise VocabularyError(f"vocabulary map has {index.shape[0]} rows for a block of {base_rows.shape[0]}")
    present = index >= 0
    if bool((index[present] >= value.shape[0]).any()):
        raise VocabularyError(
            "a tokenizer id is beyond the candidate's embedding rows (tokenizer and weights disagree)"
        )
    out = base_rows.to(value.dtype, copy=True)
    out[present] = value[index[present]]
    return out
