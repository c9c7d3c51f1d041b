"""``python -m evals.run --ks``: a narrower plan for experiments 3 and 9, checked early,
whose results go to files of their own."""

from __future__ import annotations

import pytest

from evals.experiments import e1_main, e3_relevant, e9_relevant_all
from evals.run import relevant_ks, results_tag, write_timings


def test_ks_pick_some_of_the_plans_counts_in_order():
    assert relevant_ks("", "full", [e3_relevant]) == ()
    assert relevant_ks("20,8", "full", [e3_relevant, e9_relevant_all]) == (8, 20)
    assert relevant_ks("10", "quick", [e9_relevant_all]) == (10,)


@pytest.mark.parametrize(
    "text, size, chosen, says",
    [
        ("7", "full", [e3_relevant], "the full plan has k = 4, 8, 12, 16, 20"),
        ("20", "quick", [e3_relevant], "the quick plan has k = 4, 10"),
        ("twenty", "full", [e3_relevant], "not a comma-separated list of integers"),
        (",", "full", [e3_relevant], "the full plan has k"),
        ("20", "full", [e1_main, e3_relevant], "pick them with --only (not exp1_main)"),
    ],
)
def test_bad_ks_stop_before_anything_runs_and_say_why(text, size, chosen, says):
    with pytest.raises(SystemExit) as stopped:
        relevant_ks(text, size, chosen)
    assert str(stopped.value).startswith("--ks") and says in str(stopped.value)


def test_a_narrower_plan_writes_to_its_own_files(tmp_path):
    """Its rows must never join a table of the whole plan's (or another build's) rows."""
    from evals.experiments.common import Context, Plan
    from evals.methods import Workspace

    plan = Plan("tiny", ("reverse", "firstlow"), (0, 1), (2, 3), (4, 8), 5)
    context = Context(None, plan, Workspace(tmp_path, 0), quick=True)  # type: ignore[arg-type]  # names need no pool
    assert context.suffix == "_quick"
    context.tag = "_k3"
    assert context.suffix == "_quick_k3"


def test_a_named_build_writes_to_its_own_files_too():
    assert results_tag((), "") == ""
    assert results_tag((20,), "") == "_k20"
    assert results_tag((), "intel") == "_intel"
    assert results_tag((8, 20), "intel-2") == "_k8-20_intel-2"
    for bad in ("a/b", "x y", "é"):
        with pytest.raises(SystemExit, match="--tag"):
            results_tag((), bad)


def test_a_run_of_some_methods_adds_its_timings_below_the_earlier_runs(tmp_path):
    path = tmp_path / "run_quick_exp9.md"
    path.write_text("# an earlier run\n")
    earlier = write_timings(path, ["# this run", "## Seed 0"], None, keep=True)
    write_timings(path, ["# this run", "## Seed 0", "## Seed 1"], earlier, keep=True)  # after the next seed
    assert path.read_text() == "# an earlier run\n\n# this run\n## Seed 0\n## Seed 1\n"
    write_timings(path, ["# a whole run"], None, keep=False)  # a run of every method describes itself alone
    assert path.read_text() == "# a whole run\n"
