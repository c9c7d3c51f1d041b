"""The experiments' shared machinery: records, resumption, forgetting, results files."""

from __future__ import annotations

import json

from evals.experiments import common
from evals.experiments.common import (
    DERIVED,
    PLANS,
    Context,
    forget_other_pools,
    run_cell,
)
from evals.methods import Cell, Workspace, method


def test_a_record_is_made_once_then_read_back(tiny_pool, tmp_path):
    ctx = Context(tiny_pool, PLANS["quick"], Workspace(tmp_path, 0), quick=True)
    cell = Cell(tiny_pool, ("reverse", "sort"), ("reverse", "sort"), per_task=4)
    first = run_cell(ctx, cell, method("base"))
    assert (ctx.computed, ctx.read_back) == (1, 0)
    assert set(first["scores"]) == {"reverse", "sort"} and all(0.0 <= v <= 1.0 for v in first["scores"].values())
    record = tmp_path / "records" / cell.key / "base.json"
    changed = {**json.loads(record.read_text()), "normalized": -1.0}
    record.write_text(json.dumps(changed))  # a resumed run trusts the record: it must not merge again
    assert run_cell(ctx, cell, method("base"))["normalized"] == -1.0
    assert (ctx.computed, ctx.read_back) == (1, 1)


def test_records_and_caches_of_another_build_of_the_pool_are_forgotten(tiny_pool, tmp_path):
    for name in DERIVED:
        (tmp_path / name).mkdir()
    forget_other_pools(tmp_path, tiny_pool)  # no stamp yet: nothing here is known to be of this build
    assert not any((tmp_path / name).exists() for name in DERIVED)
    (tmp_path / "records").mkdir()
    forget_other_pools(tmp_path, tiny_pool)  # the same build: kept
    assert (tmp_path / "records").is_dir()
    (tmp_path / "pool.sha256").write_text("another build")
    forget_other_pools(tmp_path, tiny_pool)
    assert not (tmp_path / "records").exists()


def test_the_written_analysis_survives_a_rewrite_of_the_results(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "ANALYSIS", tmp_path / "analysis")
    ctx = Context(None, PLANS["quick"], Workspace(tmp_path / "work", 3), quick=True)  # type: ignore[arg-type]
    drawn = []
    path = common.write_experiment(ctx, "expX", {"a": 1}, "# table\n", drawn.append)
    assert path == tmp_path / "expX_quick.md" and drawn == [tmp_path / "expX_quick.png"]
    assert "## Analysis" not in path.read_text()
    assert json.loads((tmp_path / "expX_quick.json").read_text())["seed"] == 3
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "expX_quick.md").write_text("Why it fell.\n")
    text = common.write_experiment(ctx, "expX", {"a": 2}, "# new table\n", drawn.append).read_text()
    assert text.startswith("# new table") and text.rstrip().endswith("## Analysis\n\nWhy it fell.")
