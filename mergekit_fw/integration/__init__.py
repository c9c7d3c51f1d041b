"""The only importer of mergekit (pinned to 0.1.5).

mergekit's method API changed between 0.1.4 and 0.1.5 and is changing again
upstream, so everything that touches it lives here and the layers below (pool,
calibration, oracle, solve, output) never import it; what they need of mergekit
(its TIES kernel, stock merges for ``init:``) is handed to them from here.

* :mod:`.configs`: mergekit configs into a pool spec and settings, dtypes, sizes;
* :mod:`.stock`: mergekit's own machinery handed down (TIES, stock merges, its card);
* :mod:`.replay`: the stock configs that reproduce a merge without this package;
* :mod:`.artifacts`: the files beside the weights, with mergekit's replay documents and card;
* :mod:`.method`: the registered ``frank_wolfe`` kernel;
* :mod:`.mergekit_yaml`: the ``run_merge`` wrapper that solves once before planning;
* :mod:`.autoload`: the start-up hook that wires the last two into every process.

Kept import-light on purpose: the start-up hook imports this package in every
Python process.
"""
