"""The coefficient table: the whole state of a Frank-Wolfe run.

For every tensor, the convex weight of each vertex (the base, each candidate
and, when a run starts from another merge, that merge: the last candidate row,
described by ``init``). It is small, saved as JSON beside every output, and
carries the fingerprint of the pool it belongs to so a table is never applied
to a pool that changed under it. With ``merge_fn`` it is the whole state: the
model is ``MergeFn(base, task vectors, coefficients)`` per tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_fw.files import write_json_atomic
from mergekit_fw.solve.constraints import ConstraintSet, constraint_set
from mergekit_fw.solve.lmo import candidate_coefficients

TABLE_FORMAT = "mergekit-fw/coefficient-table"
TABLE_VERSION = 3  # 3: the constraint set (hull, box, scaled_hull with its radius)
READABLE_VERSIONS = (1, 2, 3)
BASE_VERTEX = "base"
INIT_VERTEX = "init"
# meta key: the names the merge writes apart from the tensor the base ties them to
# (lm_head.weight -> the embeddings; mergekit_fw.pool.tied), which stock mergekit leaves tied
UNTIED = "untied"
# meta key: what one coefficient scales (the granularity parameter; absent: a whole candidate)
GRANULARITY = "granularity"
# meta key: why granularity auto chose what it did (absent: the config named it)
GRANULARITY_AUTO = "granularity_auto"
# meta key: why solver auto chose what it did (absent: the config named it)
SOLVER_AUTO = "solver_auto"


class TableError(ValueError):
    pass


@dataclass
class CoefficientTable:
    candidates: list[str]  # mergekit reference strings, pool order (then INIT_VERTEX)
    tensors: list[str]
    weights: torch.Tensor  # (n_vertices, n_tensors) float64, in the constraint set (columns sum to 1)
    fingerprint: str
    base_model: str
    init: dict[str, Any] | None = None  # the initial merge's config and folder
    merge_fn: str = "convex"
    density: float | None = None  # merge_fn ties only
    meta: dict[str, Any] = field(default_factory=dict)  # JSON: tasks, parameters, pool files, ...
    constraint: str = "hull"  # the set the weights live in (tables before version 3: the hull)
    radius: float | None = None  # constraint scaled_hull only

    @property
    def untied(self) -> dict[str, str]:
        """Each name the merge unties -> the stored tensor the base ties it to."""
        return dict(self.meta.get(UNTIED, {}))

    @property
    def granularity(self) -> str:
        """'candidate' (a row per candidate) or 'rank_component' (a row per rank-1
        component of each LoRA: :mod:`mergekit_fw.pool.components`)."""
        return str(self.meta.get(GRANULARITY, "candidate"))

    @property
    def constraint_set(self) -> ConstraintSet:
        return constraint_set(self.constraint, self.radius)

    @classmethod
    def at_base(cls, candidates: list[str], tensors: list[str], fingerprint: str, base_model: str) -> CoefficientTable:
        weights = torch.zeros(1 + len(candidates), len(tensors), dtype=torch.float64)
        weights[0] = 1.0
        return cls(list(candidates), list(tensors), weights, fingerprint, base_model)

    @property
    def vertices(self) -> list[str]:
        return [BASE_VERTEX, *self.candidates]

    @property
    def pool_candidates(self) -> list[str]:
        """The user's candidates (without the initial merge's vertex)."""
        return self.candidates[:-1] if self.init is not None else list(self.candidates)

    @property
    def in_hull(self) -> bool:
        """Whether the model is exactly base + sum of coefficient x task vector, and so lies
        in the constraint set the weights live in ('ties' trims and may leave it)."""
        return self.merge_fn == "convex"

    def coefficients(self) -> torch.Tensor:
        """Task-vector coefficients ``c[i, l]`` (n_candidates, n_tensors)."""
        return self.coefficients_for(self.weights)

    def coefficients_for(self, weights: torch.Tensor) -> torch.Tensor:
        """Task-vector coefficients implied by other vertex weights of this table."""
        return candidate_coefficients(weights, self.constraint_set.scale)

    def coefficient_map(self) -> dict[str, dict[str, float]]:
        """tensor -> candidate -> coefficient, for the merge kernels."""
        c = self.coefficients()
        return {
            tensor: {name: float(c[i, l]) for i, name in enumerate(self.candidates)}
            for l, tensor in enumerate(self.tensors)
        }

    def to_json(self) -> dict:
        data = {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "fingerprint": self.fingerprint,
            "base_model": self.base_model,
            "merge_fn": self.merge_fn,
            "density": self.density,
            "constraint": self.constraint,
            "radius": self.radius,
            "init": self.init,
            "vertices": self.vertices,
            "candidates": self.candidates,
            "weights": {t: [float(x) for x in self.weights[:, l]] for l, t in enumerate(self.tensors)},
            "coefficients": {t: [float(x) for x in col] for t, col in zip(self.tensors, self.coefficients().T)},
            "meta": self.meta,
        }
        return data

    @classmethod
    def from_json(cls, data: dict, source: str = "table") -> CoefficientTable:
        if data.get("format") != TABLE_FORMAT:
            raise TableError(f"{source}: not a mergekit-fw coefficient table (format={data.get('format')!r})")
        if data.get("version") not in READABLE_VERSIONS:
            raise TableError(f"{source}: unsupported table version {data.get('version')!r}")
        tensors = list(data["weights"])
        weights = torch.tensor([data["weights"][t] for t in tensors], dtype=torch.float64).T.contiguous()
        table = cls(
            candidates=list(data["candidates"]),
            tensors=tensors,
            weights=weights.reshape(len(data["vertices"]), len(tensors)),
            fingerprint=data["fingerprint"],
            base_model=data["base_model"],
            init=data.get("init"),
            merge_fn=data.get("merge_fn", "convex"),
            density=data.get("density"),
            meta=dict(data.get("meta", {})),
            constraint=data.get("constraint", "hull"),
            radius=data.get("radius"),
        )
        try:
            table.constraint_set.check(table.weights, atol=1e-6)
        except (ValueError, AssertionError) as error:
            raise TableError(f"{source}: weights outside the {table.constraint} set ({error})") from None
        if table.vertices != data["vertices"]:
            raise TableError(f"{source}: vertices {data['vertices']} do not match the candidates")
        return table

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> CoefficientTable:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise TableError(f"{path}: cannot read coefficient table ({error})") from None
        return cls.from_json(data, str(path))
