"""Experiment 3's goal lines (issue 17): mergekit-fw's rows against the best other row at
the largest k, by the mean over seeds, with the per-seed differences."""

from __future__ import annotations

from evals.experiments.e3_relevant import DEFAULTS, goal_lines
from evals.experiments.seeds import Stats


def _row(method: str, *by_seed: float) -> Stats:
    return Stats(method, method, "family", 20, list(range(len(by_seed))), list(by_seed))


def test_the_defaults_and_the_best_row_of_ours_meet_or_miss_against_the_best_other_row():
    lines = goal_lines([_row("supervised", 40.0, 50.0), _row("task_arithmetic", 30.0, 30.0),
                        _row(DEFAULTS, 41.0, 49.0), _row("pg_rank_500", 52.0, 58.0), _row("fw_rank", 45.0, 45.0)], 20)
    assert len(lines) == 2
    assert lines[0].startswith(f"- at its defaults, {DEFAULTS}: 45.0 vs supervised 45.0: +0.0")
    assert "(seed 0: +1.0, seed 1: -1.0)" in lines[0] and lines[0].endswith("**missed**")
    assert lines[1].startswith("- best row, pg_rank_500: 55.0 vs supervised 45.0: +10.0") and lines[1].endswith("**met**")


def test_ours_are_the_rows_that_run_mergekit_fw_whatever_their_name():
    """The defaults' row (``auto_screen1_both`` since solver auto) is mergekit-fw's; the
    supervised recipe per rank component, an evals baseline, is another method."""
    lines = goal_lines([_row("supervised_rank", 50.0), _row("auto_screen1_both", 61.0)], 20)
    assert len(lines) == 1 and "auto_screen1_both: 61.0 vs supervised_rank 50.0: +11.0" in lines[0]
    assert lines[0].endswith("**met**")


def test_a_k_where_one_side_did_not_run_says_so():
    assert goal_lines([_row("fw_rank", 45.0)], 20) == ["- no other method ran at this k"]
    assert goal_lines([_row("supervised", 45.0)], 20) == ["- no row of mergekit-fw ran at this k"]
    assert goal_lines([_row("supervised", 45.0), _row("fw_rank", 45.0)], 16) == ["- no other method ran at this k"]
