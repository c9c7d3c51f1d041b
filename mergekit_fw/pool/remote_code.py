"""Models and adapters that ask to run their own Python code.

A hub checkpoint whose ``config.json`` or ``tokenizer_config.json`` has an
``auto_map``, or an adapter whose ``auto_mapping`` points at a ``transformers_modules``
package, runs code from its repository when transformers or PEFT loads it. A merge
never needs that code unless the user asked for it, with mergekit's own
``--trust-remote-code``; without it such a member is refused before anything loads,
and the hub download leaves ``*.py`` files out.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_fw.pool.references import PoolError

# what a merge reads from a hub repository: weights, configs and tokenizer files (chat
# templates included: transformers 5 saves them as chat_template.jinja)
READ_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")
CODE_PATTERNS = ("*.py",)


def download_patterns(trust_remote_code: bool) -> list[str]:
    """The files to fetch from the hub: no code unless it is trusted."""
    return [*READ_PATTERNS, *(CODE_PATTERNS if trust_remote_code else ())]


def _asks(folder: Path) -> tuple[Path, str, object] | None:
    """The first file and field by which ``folder`` asks for its own code."""
    for name, key in (("config.json", "auto_map"), ("tokenizer_config.json", "auto_map")):
        path = folder / name
        value = _field(path, key)
        if value:
            return path, key, value
    path = folder / "adapter_config.json"
    mapping = _field(path, "auto_mapping")
    if isinstance(mapping, dict) and str(mapping.get("parent_library", "")).startswith("transformers_modules"):
        return path, "auto_mapping", mapping
    return None


def _field(path: Path, key: str) -> object:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, OSError):
        return None  # the reader that needs this file names what is wrong with it
    return data.get(key) if isinstance(data, dict) else None


def refuse_remote_code(folder: Path, what: str, *, trusted: bool) -> None:
    """A :class:`PoolError` naming the file and field, unless the user trusts remote code."""
    if trusted:
        return
    found = _asks(folder)
    if found is not None:
        path, key, value = found
        raise PoolError(
            f"{what} {path}: asks to run code from its repository ({key} = {json.dumps(value)}); "
            "pass --trust-remote-code (mergekit's option) if you trust it"
        )
