"""End to end: an experiment (diagnostics: two Frank-Wolfe runs through
``mergekit-fw run``, scored by lm-eval, written per seed and summarised over the
seeds recorded) on the miniature evidence pool, and lm-eval's scores checked
against an independent in-process scorer."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tiny_pool, tmp_path_factory):
    """A context over the miniature pool with a plan of its size (the quick pool's
    build takes minutes; the code paths are the same)."""
    from evals.experiments.common import Context, Plan
    from evals.methods import Workspace

    plan = Plan("tiny", ("reverse", "firstlow"), (0, 1), (2, 3), (4, 8), 5)
    return Context(tiny_pool, plan, Workspace(tmp_path_factory.mktemp("evals_tiny"), 0), quick=True)


def test_an_experiment_end_to_end_with_its_seeds_summarised(quick, tmp_path, monkeypatch):
    from evals.experiments import common, e7_diagnostics

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    e7_diagnostics.run(quick)
    text = (tmp_path / "exp7_diagnostics_quick.md").read_text()
    data = json.loads((tmp_path / "seeds" / "exp7_diagnostics_quick_seed0.json").read_text())
    assert (tmp_path / "exp7_diagnostics_quick.png").stat().st_size > 10_000
    members = quick.main_members()
    assert len(members) == 5 and len(data["task_scores"]) == 2
    assert all(len(row) == len(members) for row in data["task_scores"])
    for record in data["records"]:
        trace = record["info"]["trace"]
        iterations = len(trace["iterations"])  # 10, unless a step found no decrease on this small pool
        assert iterations == 10 or "no decrease" in trace["stopped"]
        assert trace["final_loss"] < trace["initial_loss"]
        assert record["spend"]["gradient"] == trace["passes"]["gradient"] >= iterations
        assert all(0.0 <= s <= 1.0 for s in record["scores"].values())
        # the paper's normalisation; a task whose own adapter scores 0 on this tiny pool is left out
        ratios = [record["scores"][t] / record["individual"][t] for t in quick.plan.asked if record["individual"][t] > 0]
        assert record["normalized"] == pytest.approx(100 * sum(ratios) / len(ratios) if ratios else float("nan"),
                                                     nan_ok=True)
    assert "## Loss and Frank-Wolfe gap per iteration" in text and "| reverse |" in text
    assert "seed 0:" in text
    summary = json.loads((tmp_path / "exp7_diagnostics_quick.json").read_text())
    assert summary["seeds"] == [0]
    assert {row["method"] for row in summary["summary"]} == {"fw_hard_layer", "fw_soft_task"}


def test_lm_eval_scores_agree_with_an_independent_scorer(quick):
    """lm-eval (generate_until + exact match, multiple choice by log-likelihood) and the
    in-process greedy scorer must give the same numbers on the same model."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from evals.experiments.common import run_cell
    from evals.methods import method
    from testbed.build import greedy_scores
    from testbed.data import read_rows

    cell = quick.cell(quick.main_members())
    record = run_cell(quick, cell, method("base"))
    tokenizer = AutoTokenizer.from_pretrained(str(quick.pool.base))
    model = LlamaForCausalLM.from_pretrained(str(quick.pool.base)).eval()
    for task in cell.asked:
        rows = read_rows(quick.pool.files[task].test)
        assert record["scores"][task] == pytest.approx(greedy_scores(model, tokenizer, rows), abs=1.0 / len(rows))
