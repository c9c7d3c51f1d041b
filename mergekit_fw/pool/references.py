"""Model references: the pool as the user wrote it, resolved to local folders.

Hub ids go through ``huggingface_hub.snapshot_download``, which honours
``HF_HUB_OFFLINE``; nothing here opens a weight file."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

LOG = logging.getLogger(__name__)


class PoolError(ValueError):
    """A base or candidate that cannot be merged; the message names it."""


@dataclass(frozen=True)
class ModelSource:
    """A model folder or hub id, optionally with a revision."""

    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.path if not self.revision else f"{self.path}@{self.revision}"


@dataclass(frozen=True)
class CandidateSpec:
    """One pool member as the user wrote it (``name`` is mergekit's reference string)."""

    name: str
    model: ModelSource
    lora: ModelSource | None = None


@dataclass(frozen=True)
class PoolSpec:
    base: ModelSource
    candidates: tuple[CandidateSpec, ...]
    # tokenizer_source: base: candidates' other vocabularies are aligned to the base's. Not part of
    # equality: the kernel finds the solve by base and candidates (and the fingerprint has it).
    align_vocab: bool = field(default=False, compare=False)
    # the merge's dtype (mergekit's ``dtype:``, a torch name), which ``oracle_dtype: auto``
    # follows; not part of equality for the same reason (the fingerprint has the oracle's)
    dtype: str | None = field(default=None, compare=False)
    # mergekit's --trust-remote-code: members whose configs ask for their own code are
    # loaded (and their code downloaded) only then
    trust_remote_code: bool = field(default=False, compare=False)


def local_dir(source: ModelSource, what: str, *, patterns: list[str]) -> Path:
    """A local folder for a model reference (downloading ``patterns`` when online)."""
    path = Path(source.path).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise PoolError(f"{what} {source}: expected a folder, found a file")
    looks_like_repo = re.fullmatch(r"[\w.-]+/[\w.-]+", source.path) is not None
    if not looks_like_repo:
        raise PoolError(f"{what} {source}: folder not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.path, revision=source.revision, allow_patterns=patterns))
    except Exception as error:
        raise PoolError(
            f"{what} {source}: not a local folder and could not be fetched from the hub ({error})"
        ) from None


def check_pool_spec(spec: PoolSpec) -> None:
    if not spec.candidates:
        raise PoolError("the pool has no candidates (models:) to merge")
    names = [c.name for c in spec.candidates]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise PoolError(f"candidate listed twice: {', '.join(sorted(duplicates))}")
