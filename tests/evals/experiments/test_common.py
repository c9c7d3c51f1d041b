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


def _summary(per_seed, figure):
    figure.write_bytes(b"png")
    return f"# table over seeds {sorted(per_seed)}: {[d['a'] for _, d in sorted(per_seed.items())]}\n", []


def test_each_seed_is_kept_and_the_results_are_drawn_from_all_of_them(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    for seed, value in ((3, 1), (1, 2)):
        ctx = Context(None, PLANS["quick"], Workspace(tmp_path / "work", seed), quick=True)  # type: ignore[arg-type]
        path = common.write_experiment(ctx, "expX", {"a": value}, _summary)
    assert path == tmp_path / "expX_quick.md" and (tmp_path / "expX_quick.png").is_file()
    assert path.read_text().startswith("# table over seeds [1, 3]: [2, 1]")
    assert json.loads((tmp_path / "seeds" / "expX_quick_seed3.json").read_text())["a"] == 1
    assert json.loads((tmp_path / "expX_quick.json").read_text())["seeds"] == [1, 3]
    # the same seed again replaces its own record only
    common.write_experiment(Context(None, PLANS["quick"], Workspace(tmp_path / "w", 3), quick=True), "expX",  # type: ignore[arg-type]
                            {"a": 7}, _summary)
    assert path.read_text().startswith("# table over seeds [1, 3]: [2, 7]")


def test_the_written_analysis_survives_a_rewrite_of_the_results(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    ctx = Context(None, PLANS["quick"], Workspace(tmp_path / "work", 3), quick=True)  # type: ignore[arg-type]
    path = common.write_experiment(ctx, "expX", {"a": 1}, _summary)
    assert "## Analysis" not in path.read_text()
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "expX_quick.md").write_text("Why it fell.\n")
    text = common.write_experiment(ctx, "expX", {"a": 2}, _summary).read_text()
    assert text.startswith("# table over seeds [3]: [2]") and text.rstrip().endswith("## Analysis\n\nWhy it fell.")


def test_a_run_limited_to_some_methods_computes_only_those_and_keeps_the_other_rows(tiny_pool, tmp_path):
    ctx = Context(tiny_pool, PLANS["quick"], Workspace(tmp_path, 0), quick=True, compute=frozenset({"base"}))
    cell = Cell(tiny_pool, ("reverse", "sort"), ("reverse", "sort"), per_task=4)
    linear = {"method": "linear", "cell": cell.describe(), "normalized": 12.0}
    done = common.run_cells(ctx, [(cell, method("base")), (cell, method("linear"))], "test")
    assert [r["method"] for r in done] == ["base"] and ctx.computed == 1  # linear: neither computed nor recorded
    # the earlier per-seed file's linear row stays; its base row is replaced by the new one
    earlier = {"order": ["reverse"], "records": [linear, {**done[0], "normalized": -5.0}]}
    kept = common.with_kept_records({"order": ["reverse", "sort"], "records": done}, earlier)
    assert kept["order"] == ["reverse", "sort"]
    assert [(r["method"], r["normalized"]) for r in kept["records"]] == [("base", done[0]["normalized"]), ("linear", 12.0)]
