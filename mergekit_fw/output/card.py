"""The output's model card: mergekit's own card plus a Frank-Wolfe section.

mergekit writes ``README.md`` on its path; the fast path asks mergekit's
``generate_card`` for the same card. Either way a section is appended that says
what a reader of the model on the hub needs to trust it: the pool, the
calibration tasks and their sizes, the settings, how many iterations ran and why
the solve stopped, which candidates carry the weight, and how to replay the merge
with stock mergekit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from mergekit_fw.config import SOLVER_SETTINGS, SOLVER_SPECIFIC, floor_acts
from mergekit_fw.output.export import REPLAY_FILE, UNTIE_COMMAND, no_replay_reason, untie_reason
from mergekit_fw.pool.components import parent_name
from mergekit_fw.solve.table import GRANULARITY_AUTO, SOLVER_AUTO, CoefficientTable

LOG = logging.getLogger(__name__)
SECTION_TITLE = "## Frank-Wolfe merge (mergekit-fw)"
_SETTINGS = (
    "solver",
    "constraint",
    "radius",
    "granularity",
    "variant",
    "lmo",
    "lmo_score",
    "direction",
    "step",
    "iterations",
    "gradient_steps",
    "learning_rate",
    "weight_penalty",
    "screen_per_task",
    "screen_floor",
    "screen_by",
    "epsilon",
    "epsilon_relative",
    "objective",
    "samples_per_task",
    "merge_fn",
    "top_k",
    "init",
    "seed",
    "exclude_outliers",
)


def _shown(key: str, parameters: dict) -> bool:
    """Only the settings the solver that ran reads (radius: only under scaled_hull and capped_box)."""
    if key not in parameters:
        return False
    solver = parameters.get("solver", "frank_wolfe")
    if key == "radius":
        return parameters.get("constraint") in ("scaled_hull", "capped_box")
    if key == "granularity":
        return parameters.get(key) != "candidate"
    if key in ("weight_penalty", "screen_per_task"):
        return bool(parameters.get(key))
    if key == "screen_floor":
        return bool(parameters.get(key)) and floor_acts(int(parameters.get("screen_per_task") or 0))
    if key == "screen_by":
        return parameters.get(key) != "slope" and bool(parameters.get("screen_per_task"))
    if key == "solver":
        return solver != "frank_wolfe"
    return key not in SOLVER_SPECIFIC or key in SOLVER_SETTINGS.get(solver, ())


_HOW = {
    "frank_wolfe": "Frank-Wolfe merging (FW-Merging, Chen et al. 2025)",
    "projected_gradient": "projected gradient descent over FW-Merging's constraint set (Chen et al. 2025)",
    "stochastic_frank_wolfe": "stochastic Frank-Wolfe with momentum (Mokhtari et al. 2020) over FW-Merging's "
    "constraint set (Chen et al. 2025)",
}


def mean_coefficients(table: CoefficientTable) -> dict[str, float]:
    """Each candidate's mean coefficient over the tensors; under granularity
    rank_component, over its components too (the share of its directions kept)."""
    coefficients = table.coefficients()
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(table.candidates):
        rows.setdefault(parent_name(name) if table.granularity == "rank_component" else name, []).append(i)
    return {name: float(coefficients[index].mean()) for name, index in rows.items()}


def frank_wolfe_section(table: CoefficientTable, trace: dict, top: int = 5) -> str:
    meta = table.meta
    parameters = meta.get("parameters", {})
    tasks: list[str] = list(meta.get("tasks", []))
    sizes: list[int] = list(meta.get("task_samples", []))
    means = sorted(((value, name) for name, value in mean_coefficients(table).items()), reverse=True)
    multi = table.init is not None
    replay = (
        f"mergekit-multi {REPLAY_FILE} -I WORK/ --out-path OUT/ --lora-merge-cache CACHE/"
        if multi
        else f"mergekit-yaml {REPLAY_FILE} OUT/ --lora-merge-cache CACHE/"
    )
    lines = [
        SECTION_TITLE,
        "",
        f"This model was merged by {_HOW[parameters.get('solver', 'frank_wolfe')]}"
        + f" over a pool of {len({parent_name(n) for n in table.pool_candidates})} candidates on the base `{table.base_model}`, choosing per-tensor "
        "coefficients"
        + (" of each LoRA's rank-1 components" if table.granularity == "rank_component" else "")
        + " that minimise a calibration loss.",
        "",
        "**Calibration tasks:** "
        + (
            ", ".join(
                f"`{task}` ({sizes[i]} samples)" if i < len(sizes) else f"`{task}`" for i, task in enumerate(tasks)
            )
            or "not recorded"
        ),
        "",
        "**Settings:** " + ", ".join(f"`{key}: {parameters[key]}`" for key in _SETTINGS if _shown(key, parameters)),
        "",
        *(
            [f"**Granularity** chosen by `granularity: auto`: {table.granularity} ({meta[GRANULARITY_AUTO]}).", ""]
            if GRANULARITY_AUTO in meta
            else []
        ),
        *(
            [
                f"**Solver** chosen by `solver: auto`: {parameters.get('solver', 'frank_wolfe')} ({meta[SOLVER_AUTO]}).",
                "",
            ]
            if SOLVER_AUTO in meta
            else []
        ),
        f"**Run:** {len(trace.get('iterations', []))} "
        f"{'iterations' if parameters.get('solver', 'frank_wolfe') == 'frank_wolfe' else 'gradient steps'}; stopped because {trace.get('stopped')}; "
        f"calibration loss {_fmt(trace.get('initial_loss'))} -> {_fmt(trace.get('final_loss'))}.",
        "",
        f"**Candidates carrying the most weight** (mean coefficient over {len(table.tensors)} tensors):",
        "",
        "| candidate | mean coefficient |",
        "| --- | --- |",
        *(f"| `{name}` | {value:.3f} |" for value, name in means[:top]),
        "",
    ]
    adapter = trace.get("adapter")
    if adapter:
        ranks = sorted(set(adapter.get("ranks", {}).values()))
        how = "exact" if adapter.get("rank") is None else f"truncated to rank {adapter['rank']} by SVD"
        lines += [
            f"**Written as a PEFT LoRA adapter** ({how}; ranks {ranks or 'none'}; largest relative error "
            f"{adapter.get('max_relative_error', 0.0):.2e}). Load it on `{table.base_model}` with PEFT "
            "(`PeftModel.from_pretrained(base, THIS_FOLDER)`) or lm-eval "
            "(`--model hf --model_args pretrained=BASE,peft=THIS_FOLDER`).",
            "",
        ]
        if adapter.get("modules_to_save"):
            lines += [
                "Modules with a dense delta (a full fine-tune, a LoRA's `modules_to_save`, the initial merge) are "
                "saved whole as `modules_to_save`: " + ", ".join(f"`{m}`" for m in adapter["modules_to_save"]),
                "",
            ]
    screen = trace.get("screen")
    if screen:
        lines += [
            f"**Screened** (`screen_per_task: {screen['per_task']}`"
            + (f", `screen_floor: {screen['floor']}`" if screen.get("floor") and floor_acts(screen["per_task"]) else "")
            + (f", `screen_by: {screen['by']}`" if screen.get("by", "slope") != "slope" else "")
            + f"): the solve used {len(screen['kept'])} of "
            f"{len(screen['kept']) + len(screen['dropped'])} members, those "
            + {
                "slope": "whose first gradient fell most steeply on some task's rows",
                "loss": "that lowered some task's loss most when merged alone",
                "both": "whose first gradient fell most steeply on some task's rows or that lowered its loss "
                "most when merged alone",
            }[screen.get("by", "slope")]
            + ": "
            + "; ".join(f"`{task}`: " + ", ".join(f"`{m}`" for m in top) for task, top in screen["by_task"].items())
            + ". Held at 0: "
            + (", ".join(f"`{m}`" for m in screen["dropped"]) or "none")
            + ".",
            "",
        ]
    excluded = trace.get("excluded") or {}
    if excluded:
        lines += ["**Left out as outliers:** " + "; ".join(f"`{n}` ({why})" for n, why in excluded.items()), ""]
    no_replay = no_replay_reason(table.granularity)
    if no_replay is not None:
        lines += [
            "The coefficient table is `fw_table.json`, the trace `fw_trace.json`, plots `fw_*.png`. "
            f"**No replay config:** {no_replay}",
            "",
        ]
        return "\n".join(lines)
    untied = table.untied
    if untied:
        lines += [f"**Untied:** {untie_reason(untied)} The replay below sets the flag after mergekit.", ""]
    lines += [
        "The coefficient table is `fw_table.json`, the trace `fw_trace.json`, plots `fw_*.png`. "
        "Replay with stock mergekit (this package not needed):",
        "",
        "```sh",
        f"MERGEKIT_FW_AUTOLOAD=0 {replay}",
        *([UNTIE_COMMAND] if untied else []),
        "```",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.4f}"


def write_model_card(
    folder: Path,
    table: CoefficientTable,
    trace: dict,
    name: str,
    mergekit_card: Callable[[str], tuple[str, str]] | None = None,
) -> None:
    """Append the section to mergekit's card. When mergekit wrote none (the fast
    path), ``mergekit_card(name)`` gives (its card, its config YAML) to write first."""
    card = folder / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        if SECTION_TITLE in text:
            text = text[: text.index(SECTION_TITLE)].rstrip() + "\n"
    elif mergekit_card is not None:
        text, config_yaml = mergekit_card(name)
        (folder / "mergekit_config.yml").write_text(config_yaml, encoding="utf-8")
    else:
        text = f"# {name}\n"
    card.write_text(text.rstrip() + "\n\n" + frank_wolfe_section(table, trace), encoding="utf-8")
