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
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import yaml

from mergekit_fw import METHOD_NAME
from mergekit_fw.config import ConfigError, FrankWolfeParameters, parse_parameters
from mergekit_fw.pool import CandidateSpec, ModelSource, PoolSpec

LOG = logging.getLogger(__name__)
SUPPORTED_MERGEKIT = "0.1.5"

_TABLES: Dict[Tuple[PoolSpec, FrankWolfeParameters], Dict[str, Dict[str, float]]] = {}
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
    return PoolSpec(base=_source(merge_config.base_model.model), candidates=tuple(candidates)), params


# --- the merge method -------------------------------------------------------------


def _merge_with_table(group, coefficients: Optional[Dict[str, float]]) -> torch.Tensor:
    base = group.base
    if base is None:
        raise ValueError(f"{METHOD_NAME}: no base tensor for {group.metadata.name}")
    if not coefficients:
        return base.tensor
    dtype = torch.float64 if base.tensor.dtype == torch.float64 else torch.float32
    result = base.tensor.to(dtype).clone()
    base_value = base.tensor.to(dtype)
    for entry in group.non_base:
        weight = coefficients.get(reference_name(entry.id), 0.0)
        if weight != 0.0:
            result.add_(entry.tensor.to(dtype) - base_value, alpha=weight)
    return result.to(base.tensor.dtype)


def _coefficients_for(group, params: FrankWolfeParameters) -> Dict[str, Dict[str, float]]:
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
            _TABLES[key] = solve_cached(spec, params).table.coefficient_map()
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
            params = FrankWolfeParameters(**kwargs)
            table = _coefficients_for(group, params)
            return _merge_with_table(group, table.get(group.metadata.name))

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


def remember_table(spec: PoolSpec, params: FrankWolfeParameters, coefficient_map: Dict[str, Dict[str, float]]) -> None:
    with _TABLES_LOCK:
        _TABLES[(spec, params)] = coefficient_map


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
        spec, params = pool_and_parameters(merge_config)
        result = solve_cached(spec, params, progress=not getattr(options, "quiet", False))
        remember_table(spec, params, result.table.coefficient_map())
        value = original(merge_config, out_path, *args, **kwargs)
        write_artifacts(Path(out_path), result, merge_config)
        return value

    run_merge._mergekit_fw = True  # type: ignore[attr-defined]
    module.run_merge = run_merge


def replay_config(table, merge_config=None) -> dict:
    """A stock ``task_arithmetic`` config that reproduces the table's weights.

    mergekit's ``filter:`` is a substring match where the first match wins, so
    full tensor names are listed longest first (no name can then be shadowed by
    a shorter one that it contains), closed by a catch-all weight of 0.
    """
    coefficients = table.coefficients()
    order = sorted(range(len(table.tensors)), key=lambda l: (-len(table.tensors[l]), table.tensors[l]))
    models = []
    for i, name in enumerate(table.candidates):
        weights = [{"filter": table.tensors[l], "value": float(coefficients[i, l])} for l in order]
        weights.append({"value": 0.0})
        models.append({"model": name, "parameters": {"weight": weights}})
    config: Dict[str, Any] = {
        "merge_method": "task_arithmetic",
        "base_model": table.base_model,
        "models": models,
        "parameters": {"normalize": False, "lambda": 1.0},
    }
    for key in ("dtype", "out_dtype", "tokenizer_source", "chat_template"):
        value = getattr(merge_config, key, None) if merge_config is not None else None
        if value is not None:
            config[key] = value if isinstance(value, str) else str(value)
    return config


def validate_replay(config: dict) -> None:
    """The replay must be a config mergekit itself accepts."""
    from mergekit.config import MergeConfiguration

    MergeConfiguration.model_validate(config)


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
