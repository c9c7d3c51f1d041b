"""``solver: auto``: projected gradient where the coefficients are many, Frank-Wolfe elsewhere.

Measured on the full testbed (issue 17; ``evals/results/analysis/solver_auto.md``): with one
coefficient per LoRA rank component the box has thousands of coordinates a tensor, and hard
FW at 30 iterations stops at its cap with 20 asked tasks (the gap at 31-82% of the first),
where projected gradient on the same screened members, at fewer passes than the supervised
baseline, scores about 12 points more; on the 16-member pool with 4 asked tasks the two are
level (+0.4). Per candidate, and so below 50 rows a task (where ``granularity: auto`` keeps
whole candidates), projected gradient's steps of one batch a task each cover every row: at
10 rows a task its 200 steps spent 602 forward-pass equivalents against FW's 144, for 2.7
points more (the quick testbed's experiment 5); on the quick main pool per candidate the two
were level. So ``auto`` follows the granularity: projected gradient per rank component, FW,
with its gap as a certificate, per candidate.

A setting that only one solver reads, given at a value other than its default, names that
solver: a config that sets ``iterations: 10`` or ``step: quadratic`` gets Frank-Wolfe, one
that sets ``gradient_steps`` gets projected gradient. The rule reads values, not which
fields were typed, so ``mergekit-yaml`` (whose kernel sees defaults filled in) and
``mergekit-fw run`` resolve the same solver, and the resolved value enters the solve's
fingerprint: a solve chosen this way and one that named the same solver are one cached solve.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergekit_fw.config import FrankWolfeParameters


@dataclass(frozen=True)
class SolverChoice:
    solver: str
    reason: str


def choose_solver(params: FrankWolfeParameters) -> SolverChoice:
    """What ``auto`` resolves to, and why (said in the log and the card). ``params`` has
    its granularity resolved."""
    for solver, named in params.named_for_solvers().items():
        if named:
            return SolverChoice(solver, f"{', '.join(named)} set, which only {solver} reads")
    if params.granularity == "rank_component":
        return SolverChoice(
            "projected_gradient",
            "one coefficient per LoRA rank component: many coordinates a tensor, which projected gradient "
            "fits further than Frank-Wolfe's iterations",
        )
    return SolverChoice(
        "frank_wolfe",
        f"granularity {params.granularity}: few coefficients a tensor, where Frank-Wolfe spends fewer passes and "
        "keeps its gap as a certificate",
    )


def resolve_solver(params: FrankWolfeParameters) -> tuple[FrankWolfeParameters, SolverChoice | None]:
    """``params`` with ``solver: auto`` replaced by its choice (None: it was set)."""
    if params.solver != "auto":
        return params, None
    choice = choose_solver(params)
    return params.model_copy(update={"solver": choice.solver}), choice
