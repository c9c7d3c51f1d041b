"""Everything that touches mergekit's API, in one place (pinned to mergekit 0.1.5).

mergekit's method API changed between 0.1.4 and 0.1.5 and is changing again
upstream, so the rest of the package never imports mergekit directly.

* :func:`register_method` registers ``frank_wolfe`` as a 0.1.5 ``MergeMethod``
  whose parameters are the fields of :class:`FrankWolfeParameters`.
* :func:`wrap_run_merge` makes ``mergekit-yaml`` solve once, before planning, and
  write the table, trace and replay config beside the merged weights. A kernel
  call that finds no solve (mergekit used as a library) solves lazily, under the
  same lock and cache.
* The kernel itself is a weighted sum over the inputs, accumulated one input at a
  time: ``base + sum_i c[i, l] * (theta_i - base)``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

from mergekit_fw import METHOD_NAME
from mergekit_fw.config import ConfigError, FrankWolfeParameters, from_method_kwargs, parse_parameters
from mergekit_fw.pool import CandidateSpec, ModelSource, PoolSpec

LOG = logging.getLogger(__name__)
SUPPORTED_MERGEKIT = "0.1.5"

_TABLES: Dict[Tuple[PoolSpec, FrankWolfeParameters], "KernelPlan"] = {}
_TABLES_LOCK = threading.Lock()


# --- configs -----------------------------------------------------------------


def _source(path) -> ModelSource:
    return ModelSource(path=str(path.path), revision=path.revision)


def reference_name(reference) -> str:
    """mergekit's own string for a model reference (``BASE+ADAPTER`` for LoRAs)."""
    return str(reference)


def load_merge_config(config_file: Path):
    """Read a YAML file into mergekit's ``MergeConfiguration``, naming the file on error."""
    from mergekit.config import MergeConfiguration

    try:
        raw = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{config_file}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{config_file}: not valid YAML ({error})") from None
    try:
        return MergeConfiguration.model_validate(raw)
    except Exception as error:
        raise ConfigError(f"{config_file}: not a valid mergekit config: {error}") from None


def pool_and_parameters(merge_config, source: str = "config") -> Tuple[PoolSpec, FrankWolfeParameters]:
    """The pool and settings a ``frank_wolfe`` config describes, fully validated."""
    if merge_config.merge_method != METHOD_NAME:
        raise ConfigError(f"{source}: merge_method is {merge_config.merge_method!r}, expected {METHOD_NAME!r}")
    if merge_config.slices or merge_config.modules:
        raise ConfigError(f"{source}: frank_wolfe merges whole models: use models:, not slices: or modules:")
    if merge_config.base_model is None:
        raise ConfigError(f"{source}: base_model: frank_wolfe needs the base model the candidates were tuned from")
    params = parse_parameters(merge_config.parameters, source=source)
    tokenizer = getattr(merge_config, "tokenizer", None)
    align_vocab = False
    for key, value in (("tokenizer_source", getattr(merge_config, "tokenizer_source", None)),
                       ("tokenizer.source", getattr(tokenizer, "source", None))):
        if value is None:
            continue
        if str(value) != "base":
            raise ConfigError(
                f"{source}: {key}: {value}: frank_wolfe merges on the base model's vocabulary; use 'base' (candidates "
                "with other vocabularies are aligned to it by token) or leave it out"
            )
        align_vocab = True
    if tokenizer is not None and getattr(tokenizer, "tokens", None):
        raise ConfigError(f"{source}: tokenizer.tokens: per-token embedding sources are not supported by frank_wolfe")
    candidates = []
    for index, model_in in enumerate(merge_config.models or []):
        if model_in.parameters:
            keys = ", ".join(model_in.parameters)
            raise ConfigError(
                f"{source}: models[{index}].parameters ({keys}): frank_wolfe chooses per-model "
                "weights itself and takes no per-model parameters"
            )
        reference = model_in.model
        if reference == merge_config.base_model:
            continue  # listing the base among the models is harmless: it is a vertex anyway
        candidates.append(
            CandidateSpec(
                name=reference_name(reference),
                model=_source(reference.model),
                lora=_source(reference.lora) if reference.lora else None,
            )
        )
    if merge_config.base_model.lora:
        raise ConfigError(f"{source}: base_model must be a plain model, not BASE+LORA")
    return PoolSpec(base=_source(merge_config.base_model.model), candidates=tuple(candidates), align_vocab=align_vocab), params


# --- the merge method -------------------------------------------------------------


@dataclass
class KernelPlan:
    """What the kernel needs from a solved table: per-tensor weights, the merge
    function, and the solved pool (with the initial merge's vertex, which mergekit's
    graph lacks) whose files every tensor is computed from."""

    coefficients: Dict[str, Dict[str, float]]
    merge: Any
    pool: Any

    @classmethod
    def from_result(cls, table, pool) -> "KernelPlan":
        from mergekit_fw.merge_fn import merge_function

        return cls(table.coefficient_map(), merge_function(table.merge_fn, table.density), pool)


def _merge_with_plan(group, plan: KernelPlan) -> torch.Tensor:
    """The fast path's own function on the pool's own files (LoRA factors, not
    mergekit's expanded copies, which carry their own rounding): both paths write
    byte-identical tensors. Every tensor with coefficients is a base tensor of the pool."""
    from mergekit_fw.writer import merged_tensor

    base = group.base
    if base is None:
        raise ValueError(f"{METHOD_NAME}: no base tensor for {group.metadata.name}")
    name = group.metadata.name
    weights = plan.coefficients.get(name)
    if not weights:
        return base.tensor
    merged = merged_tensor(plan.pool, weights, name, plan.pool.base_index.get(name), plan.merge)
    return merged.to(base.tensor.dtype)


def _plan_for(group, params: FrankWolfeParameters) -> KernelPlan:
    """The solved table for this group's pool, solving lazily if nobody did yet."""
    from mergekit.common import ModelReference

    base_ref = group.base.id
    candidates = tuple(
        CandidateSpec(
            name=reference_name(e.id),
            model=_source(e.id.model),
            lora=_source(e.id.lora) if e.id.lora else None,
        )
        for e in group.non_base
        if isinstance(e.id, ModelReference)
    )
    spec = PoolSpec(base=_source(base_ref.model), candidates=candidates)
    key = (spec, params)
    with _TABLES_LOCK:
        if key not in _TABLES:
            from mergekit_fw.runner import solve_cached

            LOG.info("frank_wolfe: no solve registered for this pool; solving now")
            result = solve_cached(spec, params)
            _TABLES[key] = KernelPlan.from_result(result.table, result.pool)
        return _TABLES[key]


def _build_method():
    from mergekit.merge_methods.base import (
        BasePolicy,
        GroupMergeMethod,
        InputContract,
        MergeMethodSpec,
        ParameterScope,
        ParameterSpec,
    )

    # ``calibration`` is optional at this level only: mergekit's library API
    # (merge_state_dicts, merge_tensors) calls every registered method with bare
    # tensors, and there a solve is impossible (see merge_group). Configs are
    # validated by FrankWolfeParameters, where calibration is required.
    parameters = tuple(
        ParameterSpec(
            name=name,
            value_type=Optional[field.annotation] if field.is_required() else field.annotation,
            scope=ParameterScope.SHARED,
            default=None if field.is_required() else field.default,
            description=field.description,
        )
        for name, field in FrankWolfeParameters.model_fields.items()
    )

    class FrankWolfeMerge(GroupMergeMethod):
        spec = MergeMethodSpec(
            name=METHOD_NAME,
            pretty_name="Frank-Wolfe Merging",
            reference_url="https://github.com/hmarkc/FW-Merging",
            parameters=parameters,
            contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=1),
        )

        def merge_group(self, group, /, **kwargs: Any) -> torch.Tensor:
            from mergekit.common import ModelReference

            solvable = kwargs.get("calibration") is not None and all(
                isinstance(entry.id, ModelReference) for entry in group.entries
            )
            if not solvable:
                # Bare tensors: no model to compute a loss with. Frank-Wolfe's
                # starting point (the base) is the only iterate we can give.
                _warn_unsolvable()
                return group.base.tensor.clone()
            params = from_method_kwargs(kwargs)
            return _merge_with_plan(group, _plan_for(group, params))

    return FrankWolfeMerge()


_WARNED = threading.Event()


def _warn_unsolvable() -> None:
    if not _WARNED.is_set():
        _WARNED.set()
        LOG.warning(
            "frank_wolfe called on bare tensors (no calibration or no model references): "
            "nothing to optimise, returning the base tensor (Frank-Wolfe's starting point)"
        )


def register_method() -> None:
    """Register ``frank_wolfe`` once (mergekit's registry rejects duplicates)."""
    from mergekit.merge_methods import registry

    if any(m.spec.name == METHOD_NAME for m in registry.registered_methods()):
        return
    registry.register(_build_method())


def remember_solve(spec: PoolSpec, params: FrankWolfeParameters, result) -> None:
    with _TABLES_LOCK:
        _TABLES[(spec, params)] = KernelPlan.from_result(result.table, result.pool)


# --- merges that mergekit itself computes -------------------------------------------


def config_models(merge_config) -> Tuple[Optional[str], list]:
    """(base reference string, [model reference strings]) of any mergekit config."""
    base = reference_name(merge_config.base_model) if merge_config.base_model is not None else None
    return base, [reference_name(m) for m in merge_config.referenced_models() if reference_name(m) != base]


def run_mergekit(merge_config, out_path: Path, *, lora_cache: Path, seed: int, quiet: bool = True) -> None:
    """Run a stock mergekit merge (the initial point of a solve) into ``out_path``."""
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(lora_merge_cache=str(lora_cache), random_seed=seed, quiet=quiet, copy_tokenizer=True)
    run_merge(merge_config, str(out_path), options=options)


def ties_merge_function(density: float):
    """A merge function for the oracle and writer that is mergekit's own ``ties``,
    called on one tensor: weights are the table's coefficients, ``normalize`` is
    off (the weights are absolute, as in the convex merge) and ``lambda`` is 1."""
    from mergekit.merge_methods.api import merge_tensors

    def merge(name: str, base: torch.Tensor, deltas, weights) -> torch.Tensor:
        tensors = [base, *(base + delta for delta in deltas)]
        return merge_tensors(
            tensors,
            "ties",
            parameters={"weight": list(weights), "density": density, "normalize": False, "lambda": 1.0},
            base_index=0,
            name=name,
        )

    return merge


def ties_replay_parameters(density: float) -> Dict[str, Any]:
    return {"density": density, "normalize": False, "lambda": 1.0}


# --- mergekit-yaml ----------------------------------------------------------------


def wrap_run_merge(module) -> None:
    """Solve once before mergekit plans a ``frank_wolfe`` merge; other methods pass through."""
    original = module.run_merge
    if getattr(original, "_mergekit_fw", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config, out_path, *args, **kwargs):
        if getattr(merge_config, "merge_method", None) != METHOD_NAME:
            return original(merge_config, out_path, *args, **kwargs)
        from mergekit_fw.report import write_artifacts
        from mergekit_fw.runner import solve_cached

        options = kwargs.get("options", args[0] if args else None)
        try:
            spec, params = pool_and_parameters(merge_config)
            result = solve_cached(spec, params, progress=not getattr(options, "quiet", False))
        except ValueError as error:  # a bad pool, config or calibration file: say which, no traceback
            raise SystemExit(f"mergekit-fw: error: {error}") from None
        remember_solve(spec, params, result)
        started = time.perf_counter()
        value = original(merge_config, out_path, *args, **kwargs)
        write_artifacts(Path(out_path), result, merge_config, write_seconds=time.perf_counter() - started)
        return value

    run_merge._mergekit_fw = True  # type: ignore[attr-defined]
    module.run_merge = run_merge


INIT_MERGE_NAME = "fw-init"


def replay_documents(table, merge_config=None) -> List[dict]:
    """Stock mergekit configs that reproduce the table's model.

    One ``task_arithmetic`` config (``ties`` when that was the merge function)
    with per-tensor weights; when the run started from another merge, that
    merge's own config comes first, named ``fw-init`` for ``mergekit-multi``,
    and the final config uses it as one more model. mergekit's ``filter:`` is a
    substring match where the first match wins, so full tensor names are listed
    longest first (no name can then be shadowed by a shorter one that it
    contains), closed by a catch-all weight of 0.
    """
    from mergekit_fw.table import INIT_VERTEX

    coefficients = table.coefficients()
    order = sorted(range(len(table.tensors)), key=lambda l: (-len(table.tensors[l]), table.tensors[l]))
    models = []
    for i, name in enumerate(table.candidates):
        weights = [{"filter": table.tensors[l], "value": float(coefficients[i, l])} for l in order]
        weights.append({"value": 0.0})
        model = INIT_MERGE_NAME if (table.init is not None and name == INIT_VERTEX) else name
        models.append({"model": model, "parameters": {"weight": weights}})
    parameters: Dict[str, Any] = {"normalize": False, "lambda": 1.0}
    if table.merge_fn == "ties":
        parameters.update(ties_replay_parameters(table.density if table.density is not None else 1.0))
    config: Dict[str, Any] = {
        "merge_method": "ties" if table.merge_fn == "ties" else "task_arithmetic",
        "base_model": table.base_model,
        "models": models,
        "parameters": parameters,
    }
    for key in ("dtype", "out_dtype", "tokenizer_source", "chat_template"):
        value = getattr(merge_config, key, None) if merge_config is not None else None
        if value is not None:
            config[key] = value if isinstance(value, str) else str(value)
    if table.init is None:
        return [config]
    return [{"name": INIT_MERGE_NAME, **table.init["config"]}, config]


def validate_replay(documents: List[dict]) -> None:
    """Every document must be a config mergekit itself accepts."""
    from mergekit.config import MergeConfiguration

    for document in documents:
        MergeConfiguration.model_validate({k: v for k, v in document.items() if k != "name"})


def tensor_writer(out_path: Path, max_shard_size: int):
    """mergekit's own sharded writer (its shard names and index file)."""
    from mergekit.io.tensor_writer import TensorWriter

    return TensorWriter(str(out_path), max_shard_size=max_shard_size, safe_serialization=True)


def torch_dtype(name: str) -> torch.dtype:
    from mergekit.common import dtype_from_name

    return dtype_from_name(name)


def output_dtype(merge_config) -> Optional[torch.dtype]:
    """mergekit's rule: out_dtype, else dtype, else the base's own dtype (None)."""
    name = merge_config.out_dtype or merge_config.dtype
    return torch_dtype(name) if name else None


def parse_size(value: str) -> int:
    from mergekit.common import parse_kmb

    try:
        return parse_kmb(value)
    except Exception:
        raise ConfigError(f"--out-shard-size: cannot parse {value!r} (use e.g. 500M or 5B)") from None
