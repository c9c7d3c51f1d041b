"""What the experiments share: the plan of each size (asked tasks, which members
make each pool), running one method on one cell with a record on disk (so an
interrupted run resumes where it stopped, and experiments that share a cell share
its result), and the tables and figures written to ``evals/results/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from evals.common import RESULTS, THREADS, machine
from evals.experiments.seeds import Stats
from evals.methods import Cell, Method, Workspace
from evals.scoring import individual_scores, normalized, test_scores
from testbed.build import SIZES, Pool, build_pool

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Which cells each experiment visits, per testbed size (fixed before any run)."""

    size: str
    asked: Tuple[str, ...]
    irrelevant_added: Tuple[int, ...]  # experiment 2: irrelevant LoRAs next to the asked tasks' own
    relevant_asked: Tuple[int, ...]  # experiment 3: asked tasks (each with its LoRA) = pool size
    per_task: Tuple[int, ...]  # experiment 5: calibration rows per task
    main_size: int  # experiment 1: members of the main pool


PLANS = {
    "quick": Plan("quick", ("reverse", "sort", "shiftup", "firstbigger"), (0, 6), (4, 10), (10, 100), 14),
    "full": Plan("full", ("reverse", "sort", "cipher", "firstbigger"), (0, 4, 8, 12, 16), (4, 8, 12, 16, 20),
                 (10, 25, 50, 100), 16),
}


@dataclass
class Context:
    pool: Pool
    plan: Plan
    work: Workspace
    quick: bool
    computed: int = 0  # records merged and scored by this process
    # --methods: the only methods whose missing records are computed; None: every method
    compute: Optional[FrozenSet[str]] = None
    read_back: int = 0  # records found on disk (an earlier run's, or a cell another experiment shares)
    # --ks: a narrower plan writes its own results files (``exp3_relevant_k20``), so that its
    # rows never sit in one table with another plan's (or another build's) rows
    tag: str = ""

    @property
    def suffix(self) -> str:
        return ("_quick" if self.quick else "") + self.tag

    def lora(self, task: str, role: str = "task") -> str:
        return next(c["name"] for c in self.pool.candidates
                    if c["task"] == task and c["role"] == role and c["kind"] == "lora")

    def irrelevant(self) -> List[str]:
        """Task LoRAs of tasks nobody asks for, in the pool's task order."""
        return [self.lora(t) for t in self.pool.size.tasks if t not in self.plan.asked]

    def main_members(self) -> Tuple[str, ...]:
        """The asked tasks' LoRAs, their duplicates, the full fine-tunes, then irrelevant
        LoRAs up to the plan's size: relevant, redundant, dense and unrelated members."""
        asked = self.plan.asked
        members = [self.lora(t) for t in asked]
        members += [c["name"] for c in self.pool.candidates if c["role"] == "duplicate" and c["task"] in asked]
        members += [c["name"] for c in self.pool.candidates if c["kind"] == "full"]
        members += self.irrelevant()
        return tuple(members[: self.plan.main_size])

    def noisy(self) -> Tuple[str, ...]:
        return tuple(c["name"] for c in self.pool.candidates if c["role"] == "noisy")

    def cell(self, members: Sequence[str], asked: Optional[Sequence[str]] = None, per_task: int = 100) -> Cell:
        return Cell(self.pool, tuple(members), tuple(asked or self.plan.asked), per_task)

    def individual(self, tasks: Sequence[str]) -> Dict[str, float]:
        return individual_scores(self.pool, tasks, self.work.folder("individual"))


# Experiments whose cells hold only the tasks' own adapters: they can run on a pool built
# without the duplicates, the noisy members (and their second base) and the full fine-tunes.
# experiment 2 adds other tasks' own LoRAs as the irrelevant members: the tasks' adapters are enough too
TASK_ADAPTERS_ONLY = ("exp2_irrelevant", "exp3_relevant", "exp9_relevant_all")


def open_context(size: str, seed: int, work: Optional[Path] = None, quick: Optional[bool] = None,
                 tasks_only: bool = False) -> Context:
    """``tasks_only``: build only the base, the data and the tasks' own adapters. They are
    trained first, from the same seeds, so they are the full pool's own, bit for bit; the
    full testbed's second base alone takes as long again to pretrain."""
    torch.set_num_threads(THREADS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(work or Path(tempfile.gettempdir()) / f"mergekit_fw_evals_{size}_{seed}").resolve()
    plan = SIZES[size]
    if tasks_only:
        plan = replace(plan, duplicates=(), noisy=(), dense=())
    pool = build_pool(root / "pool", plan, seed)
    forget_other_pools(root, pool)
    return Context(pool, PLANS[size], Workspace(root, seed), size == "quick" if quick is None else quick)


DERIVED = ("records", "individual", "models", "calibration", "lora_merge_cache", "fw_cache", "fw_inits",
           "ta_lambda")


def forget_other_pools(root: Path, pool: Pool) -> None:
    """Records and caches belong to one build of the pool: mergekit's LoRA cache is keyed
    by path and would silently serve the old adapters' merges after a rebuild in place."""
    import hashlib

    built = hashlib.sha256((pool.root / "manifest.json").read_bytes()).hexdigest()
    stamp = root / "pool.sha256"
    if stamp.is_file() and stamp.read_text() == built:
        return
    for name in DERIVED:
        shutil.rmtree(root / name, ignore_errors=True)
    stamp.write_text(built)


def run_cell(ctx: Context, cell: Cell, method: Method) -> dict:
    """Merge, score with lm-eval, record; a finished record is read back instead."""
    record_path = ctx.work.folder("records", cell.key) / f"{method.name}.json"
    if record_path.is_file():
        ctx.read_back += 1
        record = json.loads(record_path.read_text())
        return {**record, "info": _slim(record.get("info", {}))}
    ctx.computed += 1
    out = ctx.work.folder("models", cell.key) / method.name
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    produced = method.produce(cell, out, ctx.work)
    merge_seconds = time.perf_counter() - started
    scores = test_scores(produced.model_dir, ctx.pool, cell.asked)
    individual = ctx.individual(cell.asked)
    record = {
        "method": method.name, "title": method.title, "family": method.family, "cell": cell.describe(),
        "scores": scores, "normalized": normalized(scores, individual), "individual": individual,
        "merge_seconds": round(merge_seconds, 2), "eval_seconds": round(time.perf_counter() - started - merge_seconds, 2),
        "spend": {"forward": 0.0, "gradient": 0.0, **produced.info.get("spend", {}), "seconds": round(merge_seconds, 1)},
        "info": _slim(produced.info),
    }
    if produced.scratch:
        shutil.rmtree(out, ignore_errors=True)
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(record_path)
    return record


# what a stochastic solver's step keeps in the results (hundreds of steps a solve; the
# rest is in the solve's cache)
_STEP_FIELDS = ("iteration", "loss", "gap")


def _slim(info: dict) -> dict:
    """Traces without the per-tensor choice lists (large, and in the solve's cache), and
    the stochastic solvers' steps down to their loss and gap."""
    trace = info.get("trace")
    if isinstance(trace, dict):

        def kept(it: dict) -> dict:
            if it.get("direction") in ("projected_gradient", "stochastic_frank_wolfe"):
                return {k: it[k] for k in _STEP_FIELDS if k in it}
            return {k: v for k, v in it.items() if k != "choice"}

        trace = {**trace, "iterations": [kept(it) for it in trace["iterations"]]}
        info = {**info, "trace": trace}
    return info


def run_cells(ctx: Context, jobs: Sequence[Tuple[Cell, Method]], desc: str) -> List[dict]:
    """Every job's record; under ``--methods`` a job of another method is read back where
    recorded and left out otherwise (its row is then kept from the per-seed file)."""
    records = []
    if ctx.compute is not None:
        jobs = [(cell, m) for cell, m in jobs
                if m.name in ctx.compute or (ctx.work.root / "records" / cell.key / f"{m.name}.json").is_file()]
    for cell, method in tqdm(jobs, desc=desc, leave=False):
        LOG.info("%s: %s on %d members, %d tasks, %d rows/task", desc, method.name, len(cell.members), len(cell.asked), cell.per_task)
        records.append(run_cell(ctx, cell, method))
    return records


def individual_record(ctx: Context, asked: Sequence[str]) -> dict:
    """The per-task upper bound as a table row (normalised 100 by definition)."""
    scores = ctx.individual(asked)
    return {"method": "individual", "title": "individual (own adapter per task)", "family": "reference",
            "scores": scores, "normalized": normalized(scores, scores), "merge_seconds": 0.0, "eval_seconds": 0.0,
            "info": {}}


# ---------------------------------------------------------------- writing results


Summary = Callable[[Dict[int, dict], Path], Tuple[str, List[Stats]]]


def write_experiment(ctx: Context, stem: str, data: dict, summarize: Summary) -> Path:
    """Keep this seed's data in ``evals/results/seeds/<stem>[_quick]_seed<k>.json``, then
    write ``evals/results/<stem>[_quick].{md,json,png}`` from every seed kept there.

    The analysis of a result (why a target was missed, what in the method would fix it)
    is written by a person after reading the numbers, so it lives in
    ``evals/results/analysis/<stem>[_quick].md`` and is appended on every rewrite
    instead of being lost when the experiment is run again."""
    name = stem + ctx.suffix
    seeds_folder = RESULTS / "seeds"
    seeds_folder.mkdir(parents=True, exist_ok=True)
    seed_file = seeds_folder / f"{name}_seed{ctx.work.seed}.json"
    if ctx.compute is not None and seed_file.is_file():
        data = with_kept_records(data, json.loads(seed_file.read_text()))
    seed_file.write_text(json.dumps({**data, "size": ctx.plan.size, "seed": ctx.work.seed, "machine": machine()}, indent=1))
    written = write_summary(name, ctx.plan.size, summarize)
    assert written is not None  # this seed was just kept
    return written


def with_kept_records(data: dict, kept: dict) -> dict:
    """``data`` with the records of ``kept`` (an earlier per-seed file) that it lacks: a
    run limited to some methods must not drop the rows of the others. Records are the
    same when their method and cell are."""
    def key(record: dict) -> str:
        return json.dumps([record.get("method"), record.get("cell")], sort_keys=True)

    out = dict(data)
    for name, old in kept.items():
        new = out.get(name)
        if not (isinstance(new, list) and isinstance(old, list)):
            continue
        if not all(isinstance(r, dict) and "method" in r for r in (*new, *old)):
            continue
        have = {key(r) for r in new}
        out[name] = new + [r for r in old if key(r) not in have]
    return out


def write_summary(name: str, size: str, summarize: Summary) -> Optional[Path]:
    """``evals/results/<name>.{md,json,png}`` from every seed kept for it (None: no seed yet)."""
    seeds_folder = RESULTS / "seeds"
    per_seed = {}
    for path in seeds_folder.glob(f"{name}_seed*.json"):
        seed = path.stem.rsplit("_seed", 1)[1]
        if seed.isdigit():
            per_seed[int(seed)] = json.loads(path.read_text())
    if not per_seed:
        return None
    figure = RESULTS / f"{name}.png"
    text, stats = summarize(per_seed, figure)
    seeds = sorted(per_seed)
    summary = [{"method": st.method, "title": st.title, "family": st.family, "x": st.x, "mean": st.mean, "std": st.std,
                "normalized_by_seed": st.by_seed(), "spend_by_seed": dict(zip(st.seeds, st.spend.get("seconds", [])))}
               for st in stats]
    (RESULTS / f"{name}.json").write_text(json.dumps({"size": size, "seeds": seeds, "summary": summary}, indent=1))
    footer = (f"\nTestbed `{size}`, seeds {', '.join(map(str, seeds))} (the testbed rebuilt per seed: base, "
              f"adapters, data); scores from lm-eval {_lm_eval_version()} on each task's held-out rows (exact match or "
              f"multiple-choice accuracy); normalised = mean over asked tasks of merged / individual, x100; mean ± "
              f"sample standard deviation over seeds. Passes: over the calibration set, forward-only / gradient "
              f"(forward + backward). Per-seed records: `seeds/{name}_seed<k>.json`. Figure: `{figure.name}`.\n")
    analysis = RESULTS / "analysis" / f"{name}.md"
    if analysis.is_file():
        footer += "\n## Analysis\n\n" + analysis.read_text().strip() + "\n"
    (RESULTS / f"{name}.md").write_text(text + footer)
    LOG.info("wrote %s", RESULTS / f"{name}.md")
    return RESULTS / f"{name}.md"


def records_of(per_seed: Dict[int, dict], key: str = "records") -> Dict[int, List[dict]]:
    return {seed: data[key] for seed, data in per_seed.items()}


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
