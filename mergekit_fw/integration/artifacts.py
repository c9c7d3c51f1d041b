"""What every output folder carries beside the weights, with mergekit's parts
filled in: the replay documents checked against mergekit's schema and, for a
folder mergekit did not write, mergekit's own model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergekit_fw.integration.replay import checked_replay
from mergekit_fw.integration.stock import mergekit_card
from mergekit_fw.output import report
from mergekit_fw.solve.runner import SolveResult


def write_artifacts(
    out_path: Path,
    result: SolveResult,
    merge_config: Any | None,
    write_seconds: float | None = None,
    name: str | None = None,
    extra_trace: dict | None = None,
) -> None:
    """Table, trace, replay config, plots and the model card (see :func:`mergekit_fw.output.report.write_artifacts`)."""
    report.write_artifacts(
        out_path,
        result,
        checked_replay(result.table, merge_config),
        write_seconds=write_seconds,
        name=name,
        mergekit_card=(lambda card_name: mergekit_card(merge_config, card_name)) if merge_config is not None else None,
        extra_trace=extra_trace,
    )
