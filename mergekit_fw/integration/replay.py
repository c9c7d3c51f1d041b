"""The replay config: stock mergekit documents that reproduce a coefficient table.

One ``task_arithmetic`` config (``ties`` when that was the merge function) with
per-tensor weights; when the run started from another merge, that merge's own
config comes first, named ``fw-init`` for ``mergekit-multi``, and the final config
uses it as one more model. Every document is checked against mergekit's own schema
before it is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergekit_fw.output.export import INIT_MERGE_NAME, no_replay_reason, write_replay
from mergekit_fw.solve.table import INIT_VERTEX, CoefficientTable


def ties_replay_parameters(density: float) -> dict[str, Any]:
    return {"density": density, "normalize": False, "lambda": 1.0}


def replay_documents(table: CoefficientTable, merge_config: Any | None = None) -> list[dict]:
    """Stock mergekit configs for ``table``; ``merge_config`` lends its dtype and tokenizer settings.

    mergekit's ``filter:`` is a substring match where the first match wins, so full
    tensor names are listed longest first (no name can then be shadowed by a shorter
    one that it contains), closed by a catch-all weight of 0. A table that stock mergekit cannot express
    (:func:`~mergekit_fw.output.export.no_replay_reason`) is a ValueError that says why.
    """
    reason = no_replay_reason(table.granularity)
    if reason is not None:
        raise ValueError(f"no stock mergekit replay for this table: {reason}")
    coefficients = table.coefficients()
    order = sorted(range(len(table.tensors)), key=lambda l: (-len(table.tensors[l]), table.tensors[l]))
    models = []
    for i, name in enumerate(table.candidates):
        weights: list[dict[str, Any]] = [
            {"filter": table.tensors[l], "value": float(coefficients[i, l])} for l in order
        ]
        weights.append({"value": 0.0})
        model = INIT_MERGE_NAME if (table.init is not None and name == INIT_VERTEX) else name
        models.append({"model": model, "parameters": {"weight": weights}})
    parameters: dict[str, Any] = {"normalize": False, "lambda": 1.0}
    if table.merge_fn == "ties":
        parameters.update(ties_replay_parameters(table.density if table.density is not None else 1.0))
    config: dict[str, Any] = {
        "merge_method": "ties" if table.merge_fn == "ties" else "task_arithmetic",
        "base_model": table.base_model,
        "models": models,
        "parameters": parameters,
    }
    for key in ("dtype", "out_dtype", "tokenizer_source", "chat_template"):
        value = getattr(merge_config, key, None) if merge_config is not None else None
        if value is not None:
            config[key] = value if isinstance(value, str) else str(value)
    if table.init is None:
        return [config]
    return [{"name": INIT_MERGE_NAME, **table.init["config"]}, config]


def validate_replay(documents: list[dict]) -> None:
    """Every document must be a config mergekit itself accepts."""
    from mergekit.config import MergeConfiguration

    for document in documents:
        MergeConfiguration.model_validate({k: v for k, v in document.items() if k != "name"})


def checked_replay(table: CoefficientTable, merge_config: Any | None = None) -> list[dict]:
    """The replay documents, checked against mergekit's schema; [] for a table
    with no stock replay (the card says why)."""
    if no_replay_reason(table.granularity) is not None:
        return []
    documents = replay_documents(table, merge_config)
    validate_replay(documents)
    return documents


def write_checked_replay(table: CoefficientTable, merge_config: Any | None, path: Path) -> list[dict]:
    """Build, check and write the replay config for ``table`` at ``path``."""
    documents = replay_documents(table, merge_config)
    validate_replay(documents)
    write_replay(documents, path, table.untied)
    return documents
