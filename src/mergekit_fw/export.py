"""The replay config: a stock mergekit YAML that reproduces a Frank-Wolfe merge
without this package installed (``MERGEKIT_FW_AUTOLOAD=0`` or uninstalled)."""

from __future__ import annotations

from pathlib import Path

import yaml

from mergekit_fw import mergekit_adapter
from mergekit_fw.table import CoefficientTable

REPLAY_FILE = "fw_mergekit.yml"


def write_replay(table: CoefficientTable, merge_config, path: Path) -> dict:
    """``merge_config`` (optional) lends its dtype and tokenizer settings."""
    config = mergekit_adapter.replay_config(table, merge_config)
    mergekit_adapter.validate_replay(config)
    header = (
        "# Stock mergekit config reproducing this Frank-Wolfe merge (mergekit-fw).\n"
        "# Run: mergekit-yaml fw_mergekit.yml OUT/ --lora-merge-cache CACHE/\n"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + yaml.safe_dump(config, sort_keys=False, width=1000), encoding="utf-8")
    tmp.replace(path)
    return config
