"""The evidence testbed (issue 6): tasks, pools and data whose relevance we control.

Built deterministically from a seed, cached on disk, in ``--quick`` and full
sizes. This package holds the pieces that are fixed before any method is scored:
the task catalogue (:mod:`evals.testbed.tasks`) and its data and lm-eval task
files (:mod:`evals.testbed.data`).
"""
