"""The registered ``frank_wolfe`` merge method (mergekit 0.1.5's ``MergeMethod`` API).

Its parameters are the fields of :class:`FrankWolfeParameters`. mergekit calls the
kernel once per output tensor; the kernel finds the solved table for its pool
(solved once, before planning, by :mod:`.mergekit_yaml`, which hands mergekit the
base alone, or lazily here when mergekit is used as a library) and computes the
tensor from the pool's own files with the fast path's function, so both paths
write byte-identical tensors.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch

from mergekit_fw import METHOD_NAME
from mergekit_fw.config import FrankWolfeParameters, from_method_kwargs
from mergekit_fw.integration.configs import candidate_spec, model_source
from mergekit_fw.integration.stock import solve, ties_merge_function
from mergekit_fw.merge_fn import MergeFunction, merge_function
from mergekit_fw.output.writer import merged_tensor
from mergekit_fw.pool.pool import Pool
from mergekit_fw.pool.references import PoolSpec
from mergekit_fw.solve.runner import SolveResult
from mergekit_fw.solve.table import CoefficientTable

LOG = logging.getLogger(__name__)

_TABLES: dict[tuple[PoolSpec, FrankWolfeParameters], KernelPlan] = {}
_TABLES_LOCK = threading.Lock()


@dataclass
class KernelPlan:
    """What the kernel needs from a solved table: per-tensor weights, the merge
    function, and the solved pool (with the initial merge's vertex, which mergekit's
    graph lacks) whose files every tensor is computed from."""

    coefficients: dict[str, dict[str, float]]
    merge: MergeFunction
    pool: Pool

    @classmethod
    def from_result(cls, table: CoefficientTable, pool: Pool) -> KernelPlan:
        return cls(
            table.coefficient_map(), merge_function(table.merge_fn, table.density, ties=ties_merge_function), pool
        )


def _merge_with_plan(group: Any, plan: KernelPlan) -> torch.Tensor:
    """The fast path's own function on the pool's own files (LoRA factors, not
    mergekit's expanded copies, which carry their own rounding): both paths write
    byte-identical tensors. Every tensor with coefficients is a base tensor of the pool."""
    base = group.base
    if base is None:
        raise ValueError(f"{METHOD_NAME}: no base tensor for {group.metadata.name}")
    name = group.metadata.name
    weights = plan.coefficients.get(name)
    if not weights:
        return base.tensor
    merged = merged_tensor(plan.pool, weights, name, plan.pool.base_index.get(name), plan.merge)
    return merged.to(base.tensor.dtype)


def _plan_for(group: Any, params: FrankWolfeParameters) -> KernelPlan:
    """The solved table for this group's pool, solving lazily if nobody did yet."""
    from mergekit.common import ModelReference

    candidates = tuple(candidate_spec(e.id) for e in group.non_base if isinstance(e.id, ModelReference))
    spec = PoolSpec(base=model_source(group.base.id.model), candidates=candidates)
    key = (spec, params)
    with _TABLES_LOCK:
        if key not in _TABLES:
            LOG.info("frank_wolfe: no solve registered for this pool; solving now")
            result = solve(spec, params)
            _TABLES[key] = KernelPlan.from_result(result.table, result.pool)
        return _TABLES[key]


def _build_method() -> Any:
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
            # typing.Optional takes any annotation object; `X | None` needs X to support `|`
            value_type=Optional[field.annotation] if field.is_required() else field.annotation,  # noqa: UP045
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

        def merge_group(self, group: Any, /, **kwargs: Any) -> torch.Tensor:
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


def remember_solve(spec: PoolSpec, params: FrankWolfeParameters, result: SolveResult) -> None:
    """Register a solve for the kernel, under its pool and under its base alone.

    ``mergekit-yaml`` plans over the base alone (see
    :func:`mergekit_fw.integration.mergekit_yaml.graph_config`), so its groups
    name no candidate; a pool without candidates cannot be solved, so the base-only
    key can only mean "the run's solve for this base and these settings"."""
    plan = KernelPlan.from_result(result.table, result.pool)
    with _TABLES_LOCK:
        _TABLES[(spec, params)] = plan
        _TABLES[(PoolSpec(base=spec.base, candidates=()), params)] = plan
