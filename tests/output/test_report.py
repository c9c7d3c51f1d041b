"""What a run leaves to read: the PNG figures and the model card's Frank-Wolfe section."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from mergekit_fw.cli import main
from mergekit_fw.output.plots import FIGURES
from tests.paths import write_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished(random_pool, tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    base = random_pool["base"]
    config = write_config(work / "fw.yml", {
        "merge_method": "frank_wolfe", "base_model": str(base), "dtype": "float32",
        "models": [{"model": f"{base}+{a}"} for a in random_pool["adapters"]] + [{"model": str(random_pool["dense"][0])}],
        "parameters": {"calibration": str(random_pool["calibration"]), "iterations": 3, "samples_per_task": 5}})
    import os

    os.environ["MERGEKIT_FW_CACHE"] = str(work / "cache")
    result = CliRunner().invoke(main, ["run", str(config), str(work / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    return work / "out"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_every_output_carries_the_figures(finished):
    for name in FIGURES:
        width, height = _png_size(finished / name)
        assert width > 200 and height > 200


def test_report_command_redraws_them_elsewhere(finished, tmp_path):
    result = CliRunner().invoke(main, ["report", str(finished), "--to", str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(FIGURES)


def test_report_on_a_folder_without_a_run_names_the_missing_file(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and str(tmp_path / "fw_table.json") in result.output


def test_model_card_has_mergekits_card_and_the_frank_wolfe_section(finished):
    card = (finished / "README.md").read_text()
    table = json.loads((finished / "fw_table.json").read_text())
    trace = json.loads((finished / "fw_trace.json").read_text())
    assert "mergekit" in card.split("## Frank-Wolfe merge")[0]  # mergekit's own card comes first
    assert "## Frank-Wolfe merge (mergekit-fw)" in card
    assert "`reverse` (5 samples)" in card and "`sort` (5 samples)" in card
    assert f"{len(trace['iterations'])} iterations; stopped because {trace['stopped']}" in card
    best = max(range(len(table["candidates"])),
                key=lambda i: sum(c[i] for c in table["coefficients"].values()))
    assert f"`{table['candidates'][best]}`" in card.split("Candidates carrying the most weight")[1].split("\n\n")[1]
    assert "MERGEKIT_FW_AUTOLOAD=0 mergekit-yaml fw_mergekit.yml" in card
    assert (finished / "mergekit_config.yml").is_file()
    assert len(trace["task_scores"]) == 2 and len(trace["task_scores"][0]) == len(table["candidates"])


def test_no_title_or_label_runs_past_the_figure():
    """The LMO figure of a small pool is narrow; its title used to run past the edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mergekit_fw.output.plots import build_figures, fit_texts, texts_outside

    fig, ax = plt.subplots(figsize=(2.5, 2.0))  # the check sees a cut-off title...
    ax.set_title("LMO at the start: first-order loss decrease per task")
    assert texts_outside(fig)
    fit_texts(fig)  # ...and the fitting removes it
    assert texts_outside(fig) == []
    plt.close(fig)

    table = {"candidates": ["base+loras/reverse", "base+loras/sort"], "vertices": ["base", "a", "b"],
             "weights": {"model.layers.0.self_attn.q_proj.weight": [0.5, 0.25, 0.25]},
             "coefficients": {"model.layers.0.self_attn.q_proj.weight": [0.25, 0.25]}, "meta": {"tasks": ["reverse"]}}
    trace = {"iterations": [{"iteration": 0, "loss": 1.0, "gap": 0.5}], "final_loss": 0.9,
             "stopped": "reached iterations = 1", "task_scores": [[-0.3, -0.1]]}
    for fig in build_figures(table, trace):
        assert texts_outside(fig) == []
        plt.close(fig)


@pytest.mark.parametrize("per_unit", [None, 0.0125])
def test_the_summary_names_a_weight_penalty_where_the_solve_had_one(per_unit):
    from pathlib import Path

    from mergekit_fw.output.report import summary
    from mergekit_fw.solve.runner import SolveResult
    from mergekit_fw.solve.solver import Trace
    from tests.toy import QuadraticOracle

    trace = Trace(initial_loss=1.0, final_loss=0.5, stopped="reached gradient_steps = 3", weight_penalty=per_unit)
    result = SolveResult(QuadraticOracle(2, 1, 3, seed=0).table("box"), trace, None, Path("."), False)  # type: ignore[arg-type]
    text = summary(result)
    assert ("weight penalty 0.0125 of loss per unit of candidate weight" in text) == (per_unit is not None)
    assert Trace.from_json(json.loads(json.dumps(trace.to_json()))).weight_penalty == per_unit


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_the_card_names_the_screens_floor_where_it_had_one(floor):
    from dataclasses import replace

    from mergekit_fw.output.card import frank_wolfe_section
    from mergekit_fw.solve.screen import screen_members
    from tests.toy import QuadraticOracle

    table = QuadraticOracle(3, 1, 3, seed=0).table("box")
    parameters = {"screen_per_task": 2, "screen_floor": floor}
    table = replace(table, meta={**table.meta, "tasks": ["t0"], "parameters": parameters})
    scores = torch.tensor([[-1.0, -0.05, 0.3]], dtype=torch.float64)
    screen = screen_members(scores, table.candidates, ["t0"], 2, floor=floor).to_json()
    card = frank_wolfe_section(table, {"iterations": [], "stopped": "x", "screen": screen})
    screened = "**Screened** (`screen_per_task: 2`" + (", `screen_floor: 0.1`" if floor else "") + "): the solve used"
    assert screened in card
    held = card.split("Held at 0:")[1]
    assert (f"`{table.candidates[1]}`" in held) == bool(floor) and f"`{table.candidates[2]}`" in held


@pytest.mark.parametrize("by", ["slope", "loss", "both"])
def test_the_card_says_what_ranked_the_screens_members(by):
    from dataclasses import replace

    from mergekit_fw.output.card import frank_wolfe_section
    from mergekit_fw.solve.screen import choose_members
    from tests.toy import QuadraticOracle

    table = QuadraticOracle(3, 1, 3, seed=0).table("box")
    parameters = {"screen_per_task": 1, "screen_floor": 0.1, "screen_by": by}
    table = replace(table, meta={**table.meta, "tasks": ["t0"], "parameters": parameters})
    falls = torch.tensor([[-1.0, 0.2, 0.3]], dtype=torch.float64)
    screen = choose_members(table.candidates, falls, table.candidates, ["t0"], 1, floor=0.1, by=by).to_json()
    card = frank_wolfe_section(table, {"iterations": [], "stopped": "x", "screen": screen})
    line = next(line for line in card.splitlines() if line.startswith("**Screened**"))
    # the floor judges second places: at 1 a task it has nothing to do, and the card leaves it out
    assert line.startswith("**Screened** (`screen_per_task: 1`"
                           + (f", `screen_by: {by}`" if by != "slope" else "") + "): the solve used 1 of 3 members")
    assert "screen_floor" not in card
    assert ("lowered some task's loss most when merged alone" in line) == (by == "loss")
    assert ("loss most when merged alone" in line) == (by != "slope")
    assert ("first gradient fell most steeply" in line) == (by != "loss")
    # the settings list names it only where it is not the default
    assert (f"screen_by: {by}" in card.replace(line, "")) == (by != "slope")
