"""Experiment 9 runs its methods in tiers and writes after each, so that a run the
session's end stops still reports every pool size for the methods it reached."""

from __future__ import annotations

from evals.experiments.e3_relevant import PROBES
from evals.experiments.e9_relevant_all import TIERS
from evals.methods import BEYOND, SCALING


def test_the_tiers_run_every_method_once_with_the_protocols_comparison_first():
    flat = [name for tier in TIERS for name in tier]
    assert sorted(flat) == sorted({*SCALING, *PROBES, *BEYOND}) and len(flat) == len(set(flat))
    data_free = {"linear", "ties", "dare_ties", "breadcrumbs", "della", "peft_cat", "peft_svd"}
    assert data_free <= set(TIERS[0]) and TIERS[1] == ("fw_hard_layer",)
