"""The solve: Frank-Wolfe over the coefficient table, from a starting point to a
cached, resumable result.

* :mod:`.simplex`: feasibility and the projection onto the simplex;
* :mod:`.lmo`: vertex scores, the linear minimisation oracle and the FW gap;
* :mod:`.soft`: soft FW's inner problem over the top-k points;
* :mod:`.table`: the coefficient table, the whole state of a run;
* :mod:`.solver`: the loop (steps, line search, stopping, checkpoints);
* :mod:`.stochastic`: the loop of the gradient solvers (one batch a task per step);
* :mod:`.granularity`, :mod:`.solver_choice`: what ``granularity: auto`` and ``solver: auto``
  pick for a run, and why;
* :mod:`.init`: the starting point (the base, another merge, a previous table);
* :mod:`.upstream`: what the solve borrows from mergekit, handed in;
* :mod:`.runner`: one solve per pool and settings, validated, cached and resumed.
"""
