"""The candidate-defaults report pairs each method with the supervised baseline on the
seeds both ran, and counts as outsiders exactly the members that should get no weight."""

from __future__ import annotations

import json

import pytest

from evals import defaults


def _record(method: str, members: list[str], asked: list[str], score: float, coefficients: list[float]) -> dict:
    return {
        "method": method,
        "title": method,
        "cell": {"members": members, "asked": asked, "per_task": 100},
        "normalized": score,
        "spend": {"forward": 2.0, "gradient": 10.0},
        "info": {"mean_coefficients": dict(zip(members, coefficients))},
    }


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, "RESULTS", tmp_path)
    (tmp_path / "seeds").mkdir()
    return tmp_path / "seeds"


def test_noisy_members_and_irrelevant_members_are_the_outsiders(results):
    main = ["a", "b", "x"]  # x: in the main pool, no asked task's, but not noisy
    clean = [_record("fw_box_pairwise_30", main, ["a", "b"], 70.0, [1.0, 1.0, 0.5])]
    noisy = [_record("fw_box_pairwise_30", [*main, "n1", "n2"], ["a", "b"], 69.0, [1.0, 1.0, 0.5, 0.1, 0.3])]
    (results / "exp4_noisy_quick_seed0.json").write_text(
        json.dumps({"noisy_members": ["n1", "n2"], "clean": clean, "noisy": noisy})
    )
    records = defaults.load("exp4_noisy", quick=True)[0]
    assert [defaults.outsiders_weight(r) for r in records] == [None, pytest.approx(0.2)]
    irrelevant = [_record("pg_box", ["a", "b", "c", "d"], ["a", "b"], 60.0, [1.0, 0.8, 0.2, 0.0])]
    (results / "exp2_irrelevant_quick_seed0.json").write_text(json.dumps({"records": irrelevant}))
    assert defaults.outsiders_weight(defaults.load("exp2_irrelevant", quick=True)[0][0]) == pytest.approx(0.1)


def test_the_difference_to_supervised_is_paired_on_common_seeds(results):
    members, asked = ["a", "b"], ["a", "b"]
    for seed, (supervised, fw) in enumerate([(70.0, 72.0), (60.0, 59.0)]):
        rows = [_record("supervised", members, asked, supervised, [1, 1]), _record("pg_box", members, asked, fw, [1, 1])]
        (results / f"exp1_main_quick_seed{seed}.json").write_text(json.dumps({"records": rows}))
    # a third seed where only the candidate ran must not enter the paired difference
    (results / "exp1_main_quick_seed2.json").write_text(
        json.dumps({"records": [_record("pg_box", members, asked, 10.0, [1, 1])]})
    )
    line = next(x for x in defaults.report(quick=True).splitlines() if x.startswith("| pg_box |"))
    cells = [c.strip() for c in line.split("|")]
    assert cells[2] == "0,1,2" and cells[4] == "+0.5" and cells[5] == "1/2"
