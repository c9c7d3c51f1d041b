"""The replay config: a stock mergekit YAML that reproduces a Frank-Wolfe merge
without this package installed (``MERGEKIT_FW_AUTOLOAD=0`` or uninstalled)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import yaml

from mergekit_fw import mergekit_adapter
from mergekit_fw.table import CoefficientTable

REPLAY_FILE = "fw_mergekit.yml"


def write_replay(table: CoefficientTable, merge_config, path: Path) -> List[dict]:
    """``merge_config`` (optional) lends its dtype and tokenizer settings."""
    documents = mergekit_adapter.replay_documents(table, merge_config)
    mergekit_adapter.validate_replay(documents)
    if len(documents) == 1:
        header = (
            "# Stock mergekit config reproducing this Frank-Wolfe merge (mergekit-fw).\n"
            f"# Run: mergekit-yaml {path.name} OUT/ --lora-merge-cache CACHE/\n"
        )
    else:
        header = (
            "# Stock mergekit configs reproducing this Frank-Wolfe merge (mergekit-fw): the\n"
            f"# initial merge ({mergekit_adapter.INIT_MERGE_NAME}), then the weighted merge that uses it.\n"
            f"# Run: mergekit-multi {path.name} -I WORK/ --out-path OUT/ --lora-merge-cache CACHE/\n"
        )
    text = header + yaml.safe_dump_all(documents, sort_keys=False, width=1000)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return documents
