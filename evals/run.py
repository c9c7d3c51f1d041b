"""Every experiment of the evidence study, in order, on one testbed size, for each seed.

    python -m evals.run [--quick] [--seeds 0 1 2] [--only exp1_main,exp8_entropy] [--work DIR] [--summarize]
                        [--tasks-only] [--methods m1,m2] [--ks 20]

Each seed rebuilds the testbed (base, adapters, data) in its own workspace. Cells shared
by several experiments are merged and scored once (records on disk), and a killed run
resumes where it stopped. Writes ``evals/results/exp*_<...>.md``, ``.json`` and ``.png``
from every seed recorded so far, plus ``evals/results/run[_quick].md`` with the timings
(``run[_quick]_exp3_exp9.md`` and the like when ``--only`` picks some experiments; a run
limited by ``--methods`` adds its timings below the earlier runs' instead of replacing them).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence, Tuple

from evals.common import RESULTS, machine
from evals.experiments import EXPERIMENTS
from evals.experiments.common import PLANS, TASK_ADAPTERS_ONLY, open_context, write_summary
from evals.methods import method

KS_EXPERIMENTS = ("exp3_relevant", "exp9_relevant_all")  # the experiments that walk the plan's relevant_asked


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick testbed and reduced grids")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", default="", help="comma-separated experiment stems (default: all)")
    parser.add_argument("--summarize", action="store_true",
                        help="only redraw the results from the per-seed records in evals/results/seeds/")
    parser.add_argument("--tasks-only", action="store_true",
                        help="build only the tasks' own adapters (the same ones, from the same seeds): enough for "
                             "experiments 2, 3 and 9, and on the full testbed about half the build")
    parser.add_argument("--methods", default="",
                        help="comma-separated method names: compute only their missing records; other methods' "
                             "records are read back where recorded and their rows kept from the per-seed results "
                             "file, never computed (default: every method)")
    parser.add_argument("--ks", default="",
                        help="comma-separated numbers of asked tasks for experiments 3 and 9 instead of the plan's "
                             "(each must be in the plan); results go to their own files, e.g. exp3_relevant_k20.md")
    parser.add_argument("--tag", default="",
                        help="a name for this build of the testbed (letters, digits, dashes): results go to their own "
                             "files, e.g. exp2_irrelevant_intel.md, so that rows made on different builds never share "
                             "a table")
    parser.add_argument("--work", type=Path, default=None,
                        help="parent of the per-seed workspaces (default: a temp folder per size and seed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args


def main() -> None:
    args = arguments()
    only = {s for s in args.only.split(",") if s}
    chosen = [e for e in EXPERIMENTS if not only or e.STEM in only]
    size = "quick" if args.quick else "full"
    if args.tasks_only and any(e.STEM not in TASK_ADAPTERS_ONLY for e in chosen):
        raise SystemExit(f"--tasks-only: only {', '.join(TASK_ADAPTERS_ONLY)} run on the tasks' adapters alone; "
                         "pick them with --only")
    ks = relevant_ks(args.ks, size, chosen)
    tag = results_tag(ks, args.tag)
    for name in (m for m in args.methods.split(",") if m):
        try:
            method(name)
        except KeyError as error:
            raise SystemExit(f"--methods: {error.args[0]}") from None
    if args.summarize:
        for experiment in chosen:
            written = write_summary(experiment.STEM + ("_quick" if args.quick else "") + tag, size, experiment.summarize)
            print(written or f"{experiment.STEM}: no seed recorded for the {size} testbed")
        return
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# Evidence run ({size}, seeds {', '.join(map(str, args.seeds))}; started {stamp})", "",
             "A record read back costs nothing here: it was made by an earlier run (then this is not a fresh timing) "
             "or by an earlier experiment sharing the cell.", ""]
    if args.methods:  # this run's section goes below the earlier runs' sections: say which rows it made
        lines += [f"Methods computed: {args.methods.replace(',', ', ')} (every other row read back).", ""]
    earlier: Optional[str] = None
    for seed in args.seeds:
        started = time.perf_counter()
        ctx = open_context(size, seed, args.work / f"{size}_{seed}" if args.work else None, tasks_only=args.tasks_only)
        if ks:
            ctx.plan = replace(ctx.plan, relevant_asked=ks)
        ctx.tag = tag
        if args.methods:
            ctx.compute = frozenset(m for m in args.methods.split(",") if m)
        built = time.perf_counter() - started
        timings = []
        for experiment in chosen:
            tick, computed, read_back = time.perf_counter(), ctx.computed, ctx.read_back
            path = experiment.run(ctx)
            timings.append((experiment.STEM, time.perf_counter() - tick, ctx.computed - computed,
                            ctx.read_back - read_back, path.name))
        total = time.perf_counter() - started
        lines += [f"## Seed {seed}", "", f"Pool built or reused in {built:.0f} s; total {total / 60:.1f} min on "
                  f"{machine()['cpu']} ({machine()['threads_used']} threads).", "",
                  "| experiment | seconds | records made | read back | results |", "| --- | ---: | ---: | ---: | --- |"]
        lines += [f"| {stem} | {seconds:.0f} | {made} | {back} | `{name}` |" for stem, seconds, made, back, name in timings]
        lines.append("")
        # a run of some experiments keeps its own timings file: the whole run's is not overwritten
        part = "" if len(chosen) == len(EXPERIMENTS) else "_" + "_".join(e.STEM.split("_")[0] for e in chosen)
        earlier = write_timings(RESULTS / f"run{ctx.suffix}{part}.md", lines, earlier, keep=bool(args.methods))
    print("\n".join(lines))


def write_timings(path: Path, lines: Sequence[str], earlier: Optional[str], keep: bool) -> str:
    """Write this run's timings (rewritten after each seed) below ``earlier``, the text the
    file held before this run's first write (None: not read yet; read only when ``keep``).
    Returns it for the next write."""
    if earlier is None:
        earlier = path.read_text() + "\n" if keep and path.is_file() else ""
    path.write_text(earlier + "\n".join(lines) + "\n")
    return earlier


def results_tag(ks: Sequence[int], build: str) -> str:
    """The suffix of a narrower plan's (``--ks``) or a named build's (``--tag``) results files."""
    tag = "_k" + "-".join(map(str, ks)) if ks else ""
    if build:
        if not build.replace("-", "").isascii() or not build.replace("-", "").isalnum():
            raise SystemExit(f"--tag: {build!r}: letters, digits and dashes only (it names results files)")
        tag += "_" + build
    return tag


def relevant_ks(text: str, size: str, chosen: Sequence[ModuleType]) -> Tuple[int, ...]:
    """``--ks``: a subset of the plan's asked-task counts, for experiments 3 and 9 only."""
    if not text:
        return ()
    allowed = PLANS[size].relevant_asked
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise SystemExit(f"--ks: {text!r} is not a comma-separated list of integers") from None
    if not ks or any(k not in allowed for k in ks):
        raise SystemExit(f"--ks: {text!r}: the {size} plan has k = {', '.join(map(str, allowed))}")
    others = [e.STEM for e in chosen if e.STEM not in KS_EXPERIMENTS]
    if others:
        raise SystemExit(f"--ks applies to {', '.join(KS_EXPERIMENTS)} only; pick them with --only (not {', '.join(others)})")
    return ks


if __name__ == "__main__":
    main()
