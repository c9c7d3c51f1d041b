"""What every output folder carries beside the weights: the coefficient table,
the trace of the run and the replay config."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from mergekit_fw.files import write_json_atomic
from mergekit_fw.output.card import mean_coefficients, write_model_card
from mergekit_fw.output.export import REPLAY_FILE, write_replay
from mergekit_fw.output.plots import draw_report
from mergekit_fw.solve.runner import TABLE_FILE, TRACE_FILE, SolveResult

LOG = logging.getLogger(__name__)


def stage_seconds(result: SolveResult, write_seconds: float | None) -> dict[str, float]:
    """Seconds per stage over the whole run: the iterations' oracle, LMO and step,
    and writing the weights."""
    totals = {"oracle": 0.0, "lmo": 0.0, "step": 0.0}
    for record in result.trace.iterations:
        for stage, seconds in record.seconds.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    if write_seconds is not None:
        totals["write"] = write_seconds
    return totals


def write_artifacts(
    out_path: Path,
    result: SolveResult,
    replay: list[dict],
    write_seconds: float | None = None,
    name: str | None = None,
    mergekit_card: Callable[[str], tuple[str, str]] | None = None,
    extra_trace: dict | None = None,
) -> None:
    """Table, trace, replay config, plots and the model card's Frank-Wolfe section.

    ``replay``: the stock mergekit documents (built and checked by the integration
    layer; empty when the table has none); ``name``: the output folder's final name (``out_path`` may be a
    temporary one); ``mergekit_card``: mergekit's own card, for a folder it did not write;
    ``extra_trace``: fields the writer adds to the trace (an adapter's ranks and errors)."""
    out_path.mkdir(parents=True, exist_ok=True)
    result.table.save(out_path / TABLE_FILE)
    trace = result.trace.to_json()
    trace["cache"] = str(result.cache_dir)
    trace["reused_cached_solve"] = result.reused
    trace["seconds"] = stage_seconds(result, write_seconds)
    if result.check is not None:
        trace["excluded"] = result.check.exclusions()
        trace["warnings"] = {c.name: c.warnings for c in result.check.candidates if c.warnings}
    trace.update(extra_trace or {})
    write_json_atomic(out_path / TRACE_FILE, trace)
    if replay:  # none for a table stock mergekit cannot express; the card says why
        write_replay(replay, out_path / REPLAY_FILE, result.table.untied)
    draw_report(out_path)
    write_model_card(out_path, result.table, trace, name or out_path.name, mergekit_card)
    LOG.info("wrote %s, %s, %s, plots and the model card to %s", TABLE_FILE, TRACE_FILE, REPLAY_FILE, out_path)


def summary(result: SolveResult) -> str:
    trace = result.trace
    lines = [
        f"loss {trace.initial_loss:.5f} -> {trace.final_loss:.5f} in {len(trace.iterations)} iterations ({trace.stopped})",
    ]
    last = trace.iterations[-1] if trace.iterations else None
    if last is not None:
        lines.append(f"last FW gap {last.gap:.4g}")
    if trace.weight_penalty is not None:  # the gap above is the penalised objective's
        lines.append(f"weight penalty {trace.weight_penalty:.4g} of loss per unit of candidate weight")
    if trace.screen is not None:
        dropped = trace.screen["dropped"]
        lines.append(
            f"screen: kept {len(trace.screen['kept'])} of {len(trace.screen['kept']) + len(dropped)} members"
            + (f"; held at 0: {', '.join(dropped)}" if dropped else "")
        )
    for name, value in mean_coefficients(result.table).items():
        lines.append(f"  mean coefficient {value:.3f}  {name}")
    return "\n".join(lines)
