"""Every experiment of the evidence study, in order, on one testbed size.

    python -m evals.run [--quick] [--seed 0] [--work DIR]

Cells shared by several experiments are merged and scored once (records on disk),
and a killed run resumes where it stopped. Writes ``evals/results/exp*_<...>.md``,
``.json`` and ``.png`` plus ``evals/results/run[_quick].md`` with the timings.
"""

from __future__ import annotations

import time

from evals.common import RESULTS, machine
from evals.experiments import EXPERIMENTS
from evals.experiments.cli import arguments
from evals.experiments.common import open_context


def main() -> None:
    args = arguments(__doc__.split("\n")[0])
    started = time.perf_counter()
    ctx = open_context("quick" if args.quick else "full", args.seed, args.work)
    built = time.perf_counter() - started
    timings = []
    for experiment in EXPERIMENTS:
        tick, computed, read_back = time.perf_counter(), ctx.computed, ctx.read_back
        path = experiment.run(ctx)
        timings.append((experiment.STEM, time.perf_counter() - tick, ctx.computed - computed, ctx.read_back - read_back, path.name))
    total = time.perf_counter() - started
    lines = [f"# Evidence run ({ctx.plan.size}, seed {args.seed})", "",
             f"Pool built or reused in {built:.0f} s; total {total / 60:.1f} min on {machine()['cpu']} "
             f"({machine()['threads_used']} threads).", "",
             "A record read back costs nothing here: it was made by an earlier run (then this is not a fresh timing) "
             "or by an earlier experiment sharing the cell.", "",
             "| experiment | seconds | records made | read back | results |", "| --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {stem} | {seconds:.0f} | {made} | {back} | `{name}` |" for stem, seconds, made, back, name in timings]
    (RESULTS / f"run{ctx.suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
