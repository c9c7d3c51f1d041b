"""The evidence's commands on the shared testbed (:mod:`testbed`, the repository's
one builder of synthetic pools): ``python -m evals.testbed`` builds a size and writes
its sanity table to ``evals/results/``; :mod:`evals.testbed.probe` probes a recipe.
"""
