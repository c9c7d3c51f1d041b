"""Statistics over seeds and the figures drawn from them."""

from __future__ import annotations

import statistics

import pytest

from evals.experiments.seeds import (
    DISTINCT_STYLES,
    PALETTE,
    bar_figure,
    bar_table,
    collect,
    holds,
    line_figure,
    mean_std,
    series_table,
    styles,
)


def record(method, normalized, x=4, seed_scores=None):
    return {"method": method, "title": method.upper(), "family": "frank-wolfe" if method.startswith("fw") else "data-free",
            "normalized": normalized, "scores": seed_scores or {"a": normalized / 100}, "cell": {"members": ["m"] * x},
            "spend": {"forward": 80, "gradient": 10, "seconds": 12.0}}


def test_mean_and_sample_std_over_seeds():
    assert mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(statistics.stdev([1.0, 2.0, 4.0])))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_records_group_by_method_and_point_and_keep_each_seed():
    per_seed = {0: [record("fw", 80, 4), record("fw", 70, 8)], 2: [record("fw", 90, 4), record("fw", 60, 8)]}
    stats = collect(per_seed, lambda r: len(r["cell"]["members"]))
    at = {s.x: s for s in stats}
    assert at[4].by_seed() == {0: 80, 2: 90} and at[8].mean == pytest.approx(65)
    table = series_table(stats, "n =", [4, 8])
    assert "85.0 ± 7.1" in table and "65.0 ± 7.1" in table and "-20.0" in table
    assert "| FW | 80 / 10 |" not in table  # spend belongs to the bar table
    bars = bar_table(collect({0: [record("fw", 80)], 1: [record("fw", 60)]}), ["a"])
    assert "**70.0 ± 14.1**" in bars and "| 80.0 | 60.0 |" in bars and "80 / 10 | 12" in bars


def test_seconds_of_a_solve_read_back_from_the_cache_say_so():
    reused = {**record("fw_auto", 70), "info": {"trace": {"reused_cached_solve": True}}}
    fresh = {**record("fw_auto", 60), "info": {"trace": {"reused_cached_solve": False}}}
    assert "80 / 10 | 12 (solve read back from the cache) |" in bar_table(collect({0: [reused]}), ["a"])
    assert "80 / 10 | 12 (1 of 2 solves read back from the cache) |" in bar_table(collect({0: [reused], 1: [fresh]}), ["a"])
    assert "80 / 10 | 12 |" in bar_table(collect({0: [fresh]}), ["a"])


def test_a_cell_over_fewer_seeds_than_its_table_says_which_it_has():
    per_seed = {0: [record("fw", 80), record("ta", 20)], 1: [record("fw", 60)], 2: [record("fw", 70), record("ta", 30)]}
    table = series_table(collect(per_seed, lambda r: len(r["cell"]["members"])), "n =", [4])
    assert "| FW | 70.0 ± 10.0 | +0.0 |" in table
    assert "| TA | 25.0 ± 7.1 (seeds 0, 2 only) | +0.0 |" in table
    alone = series_table(collect({0: [record("fw", 80)], 1: [record("ta", 20)]}, lambda r: len(r["cell"]["members"])), "n =", [4])
    assert "80.0 (seed 0 only)" in alone and "20.0 (seed 1 only)" in alone


def test_a_claim_names_the_seeds_it_fails_on():
    assert holds({0: True, 1: True, 2: True}) == "holds on every seed (3)"
    assert holds({0: True, 1: False, 2: False}) == "fails on seeds 1, 2 of 3"


def test_every_method_of_a_figure_gets_its_own_colour_and_marker(tmp_path):
    """Twelve methods used to share matplotlib's ten-colour cycle; each line now has
    its own colour and marker, and the seed spread is drawn as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"fw{i}" if i % 2 else f"m{i}" for i in range(14)]
    per_seed = {s: [record(n, 50 + i + s, x) for i, n in enumerate(names) for x in (4, 8)] for s in (0, 1, 2)}
    stats = collect(per_seed, lambda r: len(r["cell"]["members"]))
    captured = []
    monkey = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        captured.append(fig)
        return monkey(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        line_figure(tmp_path / "lines.png", stats, "n", "a title long enough to need care " * 3)
        bar_figure(tmp_path / "bars.png", collect({s: [record(n, 50 + s) for n in names] for s in (0, 1)}), "bars")
    finally:
        plt.Figure.savefig = monkey
    lines_fig, bars_fig = captured
    lines = [line for line in lines_fig.axes[0].get_lines() if line.get_label() in {n.upper() for n in names}]
    assert len(lines) == 14
    assert len({line.get_color() for line in lines}) == 14 and len({line.get_marker() for line in lines}) == 14
    assert len(lines_fig.axes[0].collections) == 14  # one band per method
    bar_colours = {tuple(patch.get_facecolor()[:3]) for patch in bars_fig.axes[0].patches}
    assert len(bar_colours) == 14
    from mergekit_fw.output.plots import texts_outside

    assert texts_outside(lines_fig) == [] and texts_outside(bars_fig) == []
    with pytest.raises(ValueError, match="at most"):
        styles([str(i) for i in range(DISTINCT_STYLES + 1)])
    # past the palette, the colour-marker pairs stay distinct
    assert len(set(styles([str(i) for i in range(DISTINCT_STYLES)]).values())) == DISTINCT_STYLES > len(PALETTE)
    # a bar chart names every bar on its axis, so more methods than colours is fine there
    many = styles([str(i) for i in range(len(PALETTE) + 1)], labelled=True)
    assert len(many) == len(PALETTE) + 1 and many["0"][0] == many[str(len(PALETTE))][0]
