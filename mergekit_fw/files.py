"""Files that must never be seen half-written or silently stale: atomic JSON
writes and fingerprints of settings and of the files a result was computed from."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a sibling temporary file, fsync, then rename: readers (and a run
    resumed after a kill or a power cut) never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def file_fingerprint(paths: Iterable[Path], small_limit: int = 1 << 20) -> list[tuple[str, str]]:
    """(path, digest) per file: content hash for small files, size+mtime for weights.

    Size+mtime is what notices a rebuilt pool at the same path (the case where
    mergekit's path-keyed LoRA cache goes stale) without hashing gigabytes.
    """
    out = []
    for path in sorted({Path(p).resolve() for p in paths}):
        stat = path.stat()
        if stat.st_size <= small_limit:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest = f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
        out.append((str(path), digest))
    return out


def fingerprint(parts: Sequence[object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
