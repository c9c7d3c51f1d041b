"""Experiment 1's goal line against the data-free methods: a run limited to some methods
(``--methods``) may lack either side, and the summary must still be written."""

from __future__ import annotations

from evals.experiments.e1_main import DEFAULT_FW, above_data_free
from evals.experiments.seeds import Stats


def _row(method: str, family: str, *by_seed: float) -> Stats:
    return Stats(method, method, family, 4, list(range(len(by_seed))), list(by_seed))


def test_the_defaults_meet_or_miss_against_the_best_data_free_row():
    stats = [_row("linear", "data-free", 50.0, 52.0), _row("ties", "data-free", 60.0, 62.0),
             _row(DEFAULT_FW, "frank-wolfe", 66.0, 67.0)]
    assert above_data_free(stats) == ("FW at its defaults beats the best data-free mergekit method (ties) by 5+ "
                                      "points: +5.5 -> **met**.")
    stats[-1] = _row(DEFAULT_FW, "frank-wolfe", 64.0, 65.0)
    assert above_data_free(stats).endswith("+3.5 -> **missed**.")


def test_a_run_without_data_free_rows_or_without_the_defaults_says_so():
    ours = _row(DEFAULT_FW, "frank-wolfe", 66.0)
    for stats in ([ours], [_row("linear", "data-free", 50.0)], []):
        assert above_data_free(stats).endswith("not run on these seeds.")
