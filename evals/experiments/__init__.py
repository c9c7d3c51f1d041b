"""The experiments of issues 6 and 16, each ``python -m evals.experiments.<name> [--quick]``;
``python -m evals.run`` runs them all in order (shared cells are computed once)."""

from evals.experiments import (
                               e1_main,
                               e2_irrelevant,
                               e3_relevant,
                               e4_noisy,
                               e5_data,
                               e6_ablations,
                               e7_diagnostics,
                               e8_entropy,
                               e9_relevant_all,
)

EXPERIMENTS = (e1_main, e2_irrelevant, e3_relevant, e4_noisy, e5_data, e6_ablations, e7_diagnostics, e8_entropy,
               e9_relevant_all)
