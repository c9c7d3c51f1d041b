"""One solve per pool and settings: load, fingerprint, solve or reuse, save.

Both entry points (the mergekit kernel and ``mergekit-fw``) come through
:func:`solve_cached`, so a solve is cached on disk under a fingerprint of the
settings and of the pool's files, runs at most once per process (a lock guards
the threads of mergekit's multi-GPU executor, a file lock other processes), and
resumes from its last checkpoint when a previous run was interrupted.
"""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mergekit_fw import __version__
from mergekit_fw.calibration.batches import build_calibration, encode, pad_token_id
from mergekit_fw.calibration.rows import CalibrationExample, read_jsonl, select_per_task
from mergekit_fw.config import FrankWolfeParameters, ParameterError
from mergekit_fw.distributed import Processes, current
from mergekit_fw.files import file_fingerprint, fingerprint, write_json_atomic
from mergekit_fw.merge_fn import merge_function
from mergekit_fw.pool.components import split_rank_components
from mergekit_fw.pool.pool import Pool
from mergekit_fw.pool.references import PoolSpec, check_pool_spec
from mergekit_fw.pool.validate import PoolCheck, validated_pool
from mergekit_fw.solve.granularity import resolve_granularity
from mergekit_fw.solve.init import attach_init, check_init_config, load_init_table, starting_point
from mergekit_fw.solve.solver import Trace, load_checkpoint, solve
from mergekit_fw.solve.solver_choice import resolve_solver
from mergekit_fw.solve.stochastic import solve_stochastic
from mergekit_fw.solve.table import GRANULARITY, GRANULARITY_AUTO, SOLVER_AUTO, UNTIED, CoefficientTable
from mergekit_fw.solve.upstream import Upstream, require

LOG = logging.getLogger(__name__)
TABLE_FILE = "fw_table.json"
TRACE_FILE = "fw_trace.json"
CHECKPOINT_FILE = "fw_checkpoint.json"

_LOCK = threading.Lock()
_MEMO: dict[str, tuple[CoefficientTable, Trace]] = {}


@dataclass
class SolveResult:
    table: CoefficientTable
    trace: Trace
    pool: Pool
    cache_dir: Path
    reused: bool
    check: PoolCheck | None = None  # what validation found (warnings, exclusions)


def cache_root(params: FrankWolfeParameters) -> Path:
    root = params.cache_dir or os.environ.get("MERGEKIT_FW_CACHE") or "~/.cache/mergekit_fw"
    return Path(root).expanduser()


def pickles_folder(params: FrankWolfeParameters) -> Path | None:
    """Where pickled weights are converted to safetensors; None (refused) unless allow_pickle."""
    return cache_root(params) / "converted" if params.allow_pickle else None


def tokenizer_files(folder: Path) -> list[Path]:
    """The files that decide how the calibration rows tokenise (vocabulary, special
    tokens, chat template): a changed tokenizer is a different objective."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
    found = [folder / name for name in names if (folder / name).is_file()]
    return found + sorted(folder.glob("*.jinja")) + sorted(folder.glob("chat_template.json"))


def run_fingerprint(
    spec: PoolSpec, pool: Pool, params: FrankWolfeParameters, calibration: Path, init: Path | None
) -> str:
    return fingerprint(
        [
            "mergekit-fw",
            __version__,
            {**params.fingerprint_fields(), "oracle_dtype": params.oracle_dtype_for(spec.dtype)},
            [c.name for c in spec.candidates],
            {"align_vocab": True} if spec.align_vocab else {},
            file_fingerprint(pool.files()),
            file_fingerprint([calibration]),
            file_fingerprint(tokenizer_files(pool.base_dir)),
            file_fingerprint([init]) if init is not None else "base",
        ]
    )


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


ACCELERATE_PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")


def load_tokenizer(pool: Pool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(pool.base_dir), trust_remote_code=pool.trust_remote_code)


def check_chat_rows(rows: list[CalibrationExample], tokenizer, params: FrankWolfeParameters) -> None:
    """Render every chat row that the solve will read with the base's template, so
    a base without one, or a conversation its template refuses, fails before the model loads."""
    labelled = params.objective == "cross_entropy"
    for bucket in select_per_task(rows, params.samples_per_task, warn=False).values():
        for row in bucket:
            if row.is_chat:
                encode(tokenizer, row, params.max_length, labelled, params.assistant_turns)


def load_base_model(pool: Pool, params: FrankWolfeParameters, processes: Processes, merge_dtype: str | None = None):
    """The oracle's model, in ``oracle_dtype`` (``auto``: the merge's ``merge_dtype``),
    placed by ``device_map``."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(pool)
    placement = params.device_map
    if placement in ACCELERATE_PLACEMENTS and processes.parallel:
        raise ParameterError(
            "device_map",
            f"{placement!r} spreads one model over every device; it cannot be "
            "combined with data parallel processes (give each process a device, or run one process)",
        )
    device_map = (
        placement
        if placement in ACCELERATE_PLACEMENTS
        else str(torch.device(placement) if placement else processes.device)
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(pool.base_dir),
        dtype=getattr(torch, params.oracle_dtype_for(merge_dtype)),
        device_map=device_map,
        trust_remote_code=pool.trust_remote_code,
    )
    if params.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ParameterError("gradient_checkpointing", f"{type(model).__name__} does not support it")
        # non-reentrant: the gates that carry the scores are not inputs of the layers
        enable = getattr(model, "activation_checkpointing_enable", None)  # the transformers 5 name
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def solve_cached(
    spec: PoolSpec, params: FrankWolfeParameters, *, progress: bool = True, upstream: Upstream | None = None
) -> SolveResult:
    """Validate everything cheap first, then solve (or reuse a cached solve).

    ``upstream``: mergekit's TIES kernel and stock merges, needed for ``merge_fn: ties``
    and ``init: other.yml`` (:data:`mergekit_fw.integration.stock.UPSTREAM`)."""
    calibration = params.resolved_calibration()
    rows = read_jsonl(calibration, labelled=params.objective == "cross_entropy")  # fails before the pool opens
    if params.objective == "entropy" and params.init == "base":
        # Measured: from the base, FW lowers the entropy by making the answer confident, not
        # right; from task arithmetic at 0.3 it did better (evals/results/exp8_entropy_quick.md).
        LOG.warning(
            "objective: entropy starting from the base: the entropy falls as fast for a wrong answer as for "
            "a right one, and on the testbed this start scored below AdaMerging; start from a merge of the "
            "pool (init: ta.yml, a task_arithmetic config at weight 0.3)"
        )
    if params.merge_fn == "ties":
        require(upstream, "parameters.merge_fn: ties")
    init = params.resolved_init()
    if init is not None and init.suffix != ".json":
        check_init_config(init, spec, upstream)
    check_pool_spec(spec)
    pool, check = validated_pool(
        spec,
        exclude_outliers=params.exclude_outliers,
        pickles_to=pickles_folder(params),
        cache=cache_root(params) / "checks",
    )
    LOG.info("pool checked: %d candidates", len(pool.candidates))  # a stage mark (evals/bench_7b.py reads it)
    rows_per_task = {
        task: len(bucket) for task, bucket in select_per_task(rows, params.samples_per_task, warn=False).items()
    }
    init_granularity = load_init_table(init).granularity if init is not None and init.suffix == ".json" else None
    params, chosen = resolve_granularity(params, pool, rows_per_task, init_granularity)
    if chosen is not None:
        LOG.info("granularity auto: %s (%s)", chosen.granularity, chosen.reason)
    params, solver_chosen = resolve_solver(params)
    if solver_chosen is not None:
        LOG.info("solver auto: %s (%s)", solver_chosen.solver, solver_chosen.reason)
    if params.granularity == "rank_component":
        pool = split_rank_components(pool)
        LOG.info("granularity rank_component: %d vertices besides the base", len(pool.candidates))
    if any(row.is_chat for row in rows):  # the base's template renders them: checked before any maths
        check_chat_rows(rows, load_tokenizer(pool), params)
    vertices = 1 + len(pool.candidates)
    if params.variant == "soft" and params.top_k > vertices:
        raise ParameterError(
            "top_k",
            f"{params.top_k}, but the pool has {len(pool.candidates)} candidates ({vertices} vertices with the base)",
        )
    result = _solve_or_reuse(spec, pool, params, calibration, init, progress, upstream)
    result.check = check
    reasons = {
        key: choice.reason for key, choice in ((GRANULARITY_AUTO, chosen), (SOLVER_AUTO, solver_chosen)) if choice
    }
    if reasons:  # the card says why (a copy: a cached solve's table is shared)
        result.table = replace(result.table, meta={**result.table.meta, **reasons})
    return result


def _solve_or_reuse(
    spec: PoolSpec,
    pool: Pool,
    params: FrankWolfeParameters,
    calibration: Path,
    init: Path | None,
    progress: bool,
    upstream: Upstream | None,
) -> SolveResult:
    key = run_fingerprint(spec, pool, params, calibration, init)
    folder = cache_root(params) / key
    processes = current()
    with _LOCK:
        if key in _MEMO:
            table, trace = _MEMO[key]
            pool = attach_init(pool, table.init, cache_root(params), params.seed, upstream)
            return SolveResult(table, trace, pool, folder, reused=True)
        # Under data parallel the main process holds the lock for the whole job and
        # tells the others what it found.
        with _file_lock(folder / ".lock") if processes.is_main else nullcontext():
            cached = processes.broadcast((folder / TABLE_FILE).is_file() and (folder / TRACE_FILE).is_file())
            if cached:
                LOG.info("reusing cached Frank-Wolfe solve %s", folder)
                table = CoefficientTable.load(folder / TABLE_FILE)
                trace = Trace.from_json(json.loads((folder / TRACE_FILE).read_text()))
                _MEMO[key] = (table, trace)
                with processes.main_first():
                    pool = attach_init(pool, table.init, cache_root(params), params.seed, upstream)
                return SolveResult(table, trace, pool, folder, reused=True)
            table, trace, pool = _solve(spec, pool, params, calibration, key, folder, progress, processes, upstream)
            _MEMO[key] = (table, trace)
            return SolveResult(table, trace, pool, folder, reused=False)


def _solve(
    spec: PoolSpec,
    pool: Pool,
    params: FrankWolfeParameters,
    calibration: Path,
    key: str,
    folder: Path,
    progress: bool,
    processes: Processes,
    upstream: Upstream | None,
):
    from mergekit_fw.oracle import Oracle

    model, tokenizer = load_base_model(pool, params, processes, spec.dtype)
    LOG.info("oracle model loaded in %s", next(model.parameters()).dtype)
    calib = build_calibration(
        calibration,
        tokenizer,
        samples_per_task=params.samples_per_task,
        batch_size=params.batch_size,
        max_length=params.max_length,
        objective=params.objective,
        entropy_positions=params.entropy_positions,
        answer_tokens=params.answer_tokens,
        assistant_turns=params.assistant_turns,
    )
    resumed = processes.broadcast(load_checkpoint(folder / CHECKPOINT_FILE) if processes.is_main else None)
    users_pool = pool  # without the initial merge's vertex
    with processes.main_first():
        if resumed is not None and resumed.table.fingerprint == key:
            table, trace = resumed.table, resumed.trace
            pool = attach_init(users_pool, table.init, cache_root(params), params.seed, upstream)
            trace.resumed_at.append(len(trace.iterations))
            LOG.info("resuming Frank-Wolfe solve at iteration %d", len(trace.iterations))
        else:
            resumed = None
            start = starting_point(params, spec, pool, key, cache_root(params), upstream)
            pool, table, trace = start.pool, start.table, Trace()
    samples = [sum(int(b.input_ids.shape[0]) for b in calib.batches if b.task == t) for t in range(len(calib.tasks))]
    table.meta.update(
        {"tasks": calib.tasks, "task_samples": samples, "parameters": params.model_dump(), "mergekit_fw": __version__}
    )
    if params.granularity != "candidate":  # the replay and the card read it
        table.meta[GRANULARITY] = params.granularity
    if pool.base_index.untied:  # the replay and the card say what stock mergekit leaves tied
        table.meta[UNTIED] = {name: pool.base_index.tied[name] for name in pool.base_index.untied}
    merge = (
        merge_function("ties", params.density, ties=require(upstream, "parameters.merge_fn: ties").ties)
        if params.merge_fn == "ties"
        else None
    )
    oracle = Oracle(model, pool, calib, merge=merge, progress=progress and processes.is_main, processes=processes)
    try:
        if calib.answer_tokens > 1:
            # decoded at the start, also when resuming, so a resumed solve has the same objective
            first = (
                table
                if resumed is None
                else starting_point(params, spec, users_pool, key, cache_root(params), upstream).table
            )
            oracle.decode_answers(first.coefficients(), pad_id=pad_token_id(tokenizer))
            if resumed is None:
                trace.passes["forward"] += calib.answer_tokens - 1
        saving = folder / CHECKPOINT_FILE if processes.is_main else None
        if params.solver != "frank_wolfe":
            table, trace = solve_stochastic(
                oracle,
                table,
                params,
                checkpoint=saving,
                trace=trace,
                state=resumed.extra if resumed is not None else None,
                progress=progress and processes.is_main,
            )
        else:
            table, trace = solve(
                oracle,
                table,
                params,
                checkpoint=saving,
                trace=trace,
                progress=progress and processes.is_main,
                rng_state=resumed.rng_state if resumed is not None else None,
            )
    finally:
        oracle.close()
        # The write comes next: without the oracle's model, peak memory is the larger
        # of solve and write, not their sum (modules hold reference cycles, hence collect).
        del oracle, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    LOG.info("solve finished: %d iterations, the oracle's model released", len(trace.iterations))
    if processes.is_main:
        table.save(folder / TABLE_FILE)
        write_json_atomic(folder / TRACE_FILE, trace.to_json())
        (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
    return table, trace, pool
