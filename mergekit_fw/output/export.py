"""The replay config on disk: stock mergekit YAML that reproduces a Frank-Wolfe
merge without this package installed (``MERGEKIT_FW_AUTOLOAD=0`` or uninstalled).

The documents themselves are built and checked against mergekit's schema by
:mod:`mergekit_fw.integration.replay`; this module only writes them, atomically,
with a header that says how to run them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

REPLAY_FILE = "fw_mergekit.yml"
INIT_MERGE_NAME = "fw-init"
# what makes a stock replay of an untying merge the same model: mergekit copies the
# base's config, tie flag included, and under the tie the written head is not used
UNTIE_COMMAND = (
    "python -c \"import json, pathlib; p = pathlib.Path('OUT/config.json'); c = json.loads(p.read_text()); "
    "c['tie_word_embeddings'] = False; p.write_text(json.dumps(c, indent=2))\""
)


def untie_reason(untied: dict[str, str]) -> str:
    """Why a stock replay of an untying merge needs one more step (one paragraph)."""
    pairs = ", ".join(f"{name} apart from {stored}" for name, stored in untied.items())
    return (
        f"This merge writes {pairs} (tie_word_embeddings: false), as PEFT's merge of an adapter that saves "
        "either whole does. Stock mergekit keeps the base's tie flag, under which the written head is not used, "
        "and writes the head only where its architecture for the base lists it (its gemma architecture does not: "
        "there only `mergekit-fw run` writes this merge)."
    )


def no_replay_reason(granularity: str) -> str | None:
    """Why a table has no stock replay, or None when it has one."""
    if granularity == "rank_component":
        return (
            "Its coefficients scale each LoRA's rank-1 components apart (granularity: rank_component), and "
            "stock mergekit weights whole models per tensor, so no stock mergekit config reproduces it. "
            "Without mergekit-fw, use it written as a PEFT adapter (`mergekit-fw run --output-format adapter`), "
            "which is exact."
        )
    return None


def write_replay(documents: list[dict], path: Path, untied: dict[str, str] | None = None) -> None:
    """One document: a ``mergekit-yaml`` config; two: the initial merge then the
    weighted merge that uses it, for ``mergekit-multi``. ``untied``: the table's
    (:attr:`~mergekit_fw.solve.table.CoefficientTable.untied`), said in the header."""
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
    if untied:
        lines = [*textwrap.wrap(untie_reason(untied), 90), "After mergekit, set the flag:", f"  {UNTIE_COMMAND}"]
        header += "".join(f"# {line}\n" for line in lines)
    text = header + yaml.safe_dump_all(documents, sort_keys=False, width=1000)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
