"""The replay config on disk: stock mergekit YAML that reproduces a Frank-Wolfe
merge without this package installed (``MERGEKIT_FW_AUTOLOAD=0`` or uninstalled).

The documents themselves are built and checked against mergekit's schema by
:mod:`mergekit_fw.integration.replay`; this module only writes them, atomically,
with a header that says how to run them."""

from __future__ import annotations

from pathlib import Path

import yaml

REPLAY_FILE = "fw_mergekit.yml"
INIT_MERGE_NAME = "fw-init"


def write_replay(documents: list[dict], path: Path) -> None:
    """One document: a ``mergekit-yaml`` config; two: the initial merge then the
    weighted merge that uses it, for ``mergekit-multi``."""
    if len(documents) == 1:
        header = (
            "# Stock mergekit config reproducing this Frank-Wolfe merge (mergekit-fw).\n"
            f"# Run: mergekit-yaml {path.name} OUT/ --lora-merge-cache CACHE/\n"
        )
    else:
        header = (
            "# Stock mergekit configs reproducing this Frank-Wolfe merge (mergekit-fw): the\n"
            f"# initial merge ({INIT_MERGE_NAME}), then the weighted merge that uses it.\n"
            f"# Run: mergekit-multi {path.name} -I WORK/ --out-path OUT/ --lora-merge-cache CACHE/\n"
        )
    text = header + yaml.safe_dump_all(documents, sort_keys=False, width=1000)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
