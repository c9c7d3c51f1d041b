"""The starting point of a solve: the base, another merge, or a previous run.

* ``init: other.yml``: any mergekit config over the same pool (task_arithmetic,
  ties, dare_ties, ...). mergekit itself merges it, once, into the cache; the
  result joins the pool as one more dense vertex (Algorithm 1, line 1) and the
  solve starts with all its weight on it. At iteration 0 the model is therefore
  exactly the tensors mergekit wrote for that config.
* ``init: previous/fw_table.json``: continue a previous run: same pool, same
  merge function, its vertex weights as the starting point (and its initial
  merge, if it had one, as a vertex again). A table solved per candidate also
  continues per rank component (``granularity: rank_component``, in the box):
  each component starts at its candidate's coefficient, the same model.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from mergekit_fw import METHOD_NAME
from mergekit_fw.config import ConfigError, FrankWolfeParameters, ParameterError
from mergekit_fw.files import file_fingerprint, fingerprint
from mergekit_fw.pool.candidates import load_dense
from mergekit_fw.pool.components import parent_name
from mergekit_fw.pool.pool import Pool
from mergekit_fw.pool.references import PoolError, PoolSpec
from mergekit_fw.solve.constraints import constraint_set
from mergekit_fw.solve.table import GRANULARITY, INIT_VERTEX, CoefficientTable, TableError
from mergekit_fw.solve.upstream import Upstream, require

LOG = logging.getLogger(__name__)
_COMPLETE = ".mergekit-fw-complete"


@dataclass
class Start:
    """Where a solve starts: the pool it runs on (with the init vertex) and its table."""

    pool: Pool
    table: CoefficientTable


def pool_files_fingerprint(pool: Pool) -> str:
    """The user's candidates (a split pool's by the candidates it was split from) and their files."""
    return fingerprint([list(dict.fromkeys(parent_name(n) for n in pool.names)), file_fingerprint(pool.files())])


def check_init_config(path: Path, spec: PoolSpec, upstream: Upstream | None) -> dict:
    """Read an init config and check it merges the same pool; returns its raw dict."""
    stock = require(upstream, f"parameters.init: {path}").read_config(path)
    if stock.merge_method == METHOD_NAME:
        raise ConfigError(f"{path}: init: the initial merge cannot itself be {METHOD_NAME}; use its fw_table.json")
    base, models = stock.base, stock.models
    if base is None or base != str(spec.base):
        raise ConfigError(f"{path}: init: base_model is {base!r}, but the pool's base is {str(spec.base)!r}")
    known = {c.name for c in spec.candidates}
    strangers = [m for m in models if m not in known]
    if strangers:
        raise ConfigError(
            f"{path}: init: merges models that are not in the pool: {', '.join(strangers)} "
            f"(the initial merge must be of the same pool)"
        )
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def materialize(config: dict, pool: Pool, cache_root: Path, seed: int, upstream: Upstream | None) -> Path:
    """The folder mergekit wrote for ``config``: cached by the config and the pool's files."""
    key = fingerprint(["init", config, seed, file_fingerprint(pool.files())])
    folder = cache_root / "init" / key
    if (folder / _COMPLETE).is_file():
        return folder
    tmp = folder.with_name(f".{key}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    LOG.info("merging the initial point with mergekit into %s", folder)
    try:
        # a private LoRA cache: mergekit keys its own by path and never notices a rebuilt adapter
        require(upstream, "parameters.init").merge(config, tmp / "model", tmp / "lora_cache", seed)
        shutil.rmtree(tmp / "lora_cache", ignore_errors=True)
        (tmp / _COMPLETE).write_text(key)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def attach_init(
    pool: Pool, init: dict[str, Any] | None, cache_root: Path, seed: int, upstream: Upstream | None = None
) -> Pool:
    """The pool plus the initial merge's vertex, re-merging it if its folder is gone
    (which needs ``upstream``)."""
    if init is None:
        return pool
    folder = Path(str(init["folder"]))
    if not (folder / _COMPLETE).is_file():
        folder = materialize(dict(init["config"]), pool, cache_root, seed, upstream)
        init["folder"] = str(folder)
    candidate = load_dense(INIT_VERTEX, folder / "model", pool.base_config, pool.base_index)
    # Tensors the merge left bit-identical to the base are no part of its task
    # vector: without this a LoRA pool's init would drag every embedding and norm
    # into the dense gradient.
    candidate.touched = [
        name for name in candidate.touched if not torch.equal(candidate.index.get(name), pool.base_index.get(name))
    ]
    return pool.with_candidate(candidate)


def starting_point(
    params: FrankWolfeParameters,
    spec: PoolSpec,
    pool: Pool,
    key: str,
    cache_root: Path,
    upstream: Upstream | None = None,
) -> Start:
    init_path = params.resolved_init()
    pool_files = pool_files_fingerprint(pool)  # the user's pool, without the init vertex
    radius = params.radius_used()
    if init_path is None:
        table = CoefficientTable.at_base(pool.names, pool.tensor_names(), key, str(spec.base))
    elif init_path.suffix == ".json":
        return _continue(init_path, params, spec, pool, key, cache_root, upstream)
    else:
        config = check_init_config(init_path, spec, upstream)
        folder = materialize(config, pool, cache_root, params.seed, upstream)
        init = {"name": INIT_VERTEX, "source": str(init_path), "config": config, "folder": str(folder)}
        pool = attach_init(pool, init, cache_root, params.seed, upstream)
        tensors = pool.tensor_names()
        table = CoefficientTable.at_base(pool.names, tensors, key, str(spec.base))
        table.init = init
        try:  # the whole weight on the initial merge: it is the first iterate, exactly
            table.weights = constraint_set(params.constraint, radius).start_at_init(*table.weights.shape)
        except ValueError as error:
            raise ParameterError("init", str(error)) from None
    table.constraint, table.radius = params.constraint, radius
    table.merge_fn = params.merge_fn
    table.density = params.density if params.merge_fn == "ties" else None
    table.meta["pool_files"] = pool_files
    return Start(pool, table)


def _per_component(
    previous: CoefficientTable, pool: Pool, params: FrankWolfeParameters, path: Path
) -> CoefficientTable:
    """A table solved per candidate, continued per rank component: every component
    starts at its candidate's coefficient, which is the same model. Only in the box,
    where each coefficient is bounded on its own; in a hull the components' total
    would be the rank times the candidate's weight."""
    if (previous.granularity, params.granularity) != ("candidate", "rank_component"):
        raise ConfigError(
            f"{path}: init: table was solved with granularity {previous.granularity!r}, this run uses "
            f"{params.granularity!r}; only a table per candidate continues per rank component"
        )
    if previous.constraint != "box" or params.constraint != "box":
        raise ConfigError(
            f"{path}: init: a table per candidate continues per rank component only in constraint box (each "
            f"component starts at its candidate's coefficient; in a hull their total would be the rank times it); "
            f"the table's constraint is {previous.constraint!r}, this run's {params.constraint!r}"
        )
    names = [*pool.names, *([INIT_VERTEX] if previous.init is not None else [])]
    known = {name: row for row, name in enumerate(previous.candidates)}
    strangers = sorted({parent_name(n) for n in names} - set(known))
    if strangers or len(known) != len({parent_name(n) for n in names}):
        raise ConfigError(
            f"{path}: init: table's candidates {previous.pool_candidates} differ from the pool's "
            f"{sorted({parent_name(n) for n in pool.names})}"
        )
    rows = torch.tensor([1 + known[parent_name(n)] for n in names], dtype=torch.long)
    coefficients = previous.weights[rows]
    weights = torch.cat([1.0 - coefficients.sum(dim=0, keepdim=True), coefficients], dim=0)
    return replace(previous, candidates=names, weights=weights, meta={**previous.meta, GRANULARITY: params.granularity})


def load_init_table(path: Path) -> CoefficientTable:
    """A coefficient table given as ``init``; a broken one is a config error naming it."""
    try:
        return CoefficientTable.load(path)
    except (TableError, KeyError) as error:
        raise ParameterError("init", str(error)) from None


def _continue(
    path: Path,
    params: FrankWolfeParameters,
    spec: PoolSpec,
    pool: Pool,
    key: str,
    cache_root: Path,
    upstream: Upstream | None,
) -> Start:
    previous = load_init_table(path)
    if previous.base_model != str(spec.base):
        raise ConfigError(
            f"{path}: init: table is for base {previous.base_model!r}, the pool's base is {str(spec.base)!r}"
        )
    if previous.granularity != params.granularity:
        previous = _per_component(previous, pool, params, path)
    if previous.pool_candidates != pool.names:
        raise ConfigError(
            f"{path}: init: table's candidates {previous.pool_candidates} differ from the pool's {pool.names}"
        )
    radius = params.radius_used()
    if (previous.constraint, previous.radius) != (params.constraint, radius):
        raise ConfigError(
            f"{path}: init: table was solved in constraint {previous.constraint!r}"
            + (f" (radius {previous.radius:g})" if previous.radius is not None else "")
            + f", this run uses {params.constraint!r}"
            + (f" (radius {radius:g})" if radius is not None else "")
        )
    if previous.merge_fn != params.merge_fn:
        raise ConfigError(
            f"{path}: init: table was solved with merge_fn {previous.merge_fn!r}, this run uses {params.merge_fn!r}"
        )
    pool_files = pool_files_fingerprint(pool)
    recorded = previous.meta.get("pool_files")
    if recorded is not None and recorded != pool_files:
        raise ConfigError(f"{path}: init: the pool's files changed since this table was solved")
    try:
        pool = attach_init(pool, previous.init, cache_root, params.seed, upstream)
    except PoolError as error:
        raise ConfigError(f"{path}: init: {error}") from None
    if previous.tensors != pool.tensor_names():
        raise ConfigError(f"{path}: init: table's tensors differ from the pool's")
    table = CoefficientTable(
        candidates=list(previous.candidates),
        tensors=list(previous.tensors),
        weights=previous.weights.clone(),
        fingerprint=key,
        base_model=previous.base_model,
        init=previous.init,
        merge_fn=previous.merge_fn,
        density=params.density if params.merge_fn == "ties" else None,
        meta={"pool_files": pool_files, "continued_from": str(path)},
        constraint=previous.constraint,
        radius=previous.radius,
    )
    return Start(pool, table)
