"""Settings of the ``frank_wolfe`` merge method.

These are the keys of a mergekit config's ``parameters:`` block. mergekit only
accepts scalars there, so every field is a scalar. The field descriptions are the
single source of the CLI's ``--help`` and the README's parameter table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A user-facing configuration problem, raised before any maths runs."""


class FrankWolfeParameters(BaseModel):
    """Everything that decides a Frank-Wolfe solve (and so enters its fingerprint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calibration: str = Field(
        description="Path to the calibration JSONL: one {\"task\", \"prompt\", \"completion\"} "
        "object per line; a relative path is taken from the working directory."
    )
    samples_per_task: int = Field(
        100, ge=1, description="Calibration samples used per task (the first N of each task)."
    )
    variant: Literal["hard"] = Field(
        "hard", description="Frank-Wolfe variant: 'hard' moves towards one vertex per tensor."
    )
    lmo: Literal["layer"] = Field(
        "layer", description="Linear minimisation oracle: 'layer' picks the best vertex per tensor."
    )
    iterations: int = Field(10, ge=1, description="Maximum number of Frank-Wolfe iterations.")
    epsilon: float = Field(
        0.0, ge=0.0, description="Stop once the Frank-Wolfe gap is at or below this value."
    )
    step: Literal["line_search", "schedule"] = Field(
        "line_search",
        description="Step size rule: 'line_search' (golden-section search of gamma in [0, 1] on "
        "the calibration loss; never increases it) or 'schedule' (gamma = 2 / (t + 2)).",
    )
    line_search_steps: int = Field(
        8, ge=2, le=64, description="Loss evaluations of the golden-section line search."
    )
    objective: Literal["cross_entropy"] = Field(
        "cross_entropy",
        description="Calibration objective: task-balanced cross-entropy on completion tokens.",
    )
    batch_size: int = Field(16, ge=1, description="Calibration sequences per forward pass.")
    max_length: int = Field(
        512, ge=8, description="Longest calibration sequence in tokens; longer ones are cut."
    )
    seed: int = Field(0, description="Seed for every random choice of the solve.")
    cache_dir: Optional[str] = Field(
        None,
        description="Where solves are cached by fingerprint (default: $MERGEKIT_FW_CACHE or "
        "~/.cache/mergekit_fw).",
    )

    @field_validator("calibration")
    @classmethod
    def _calibration_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("calibration must name a JSONL file")
        return value

    def resolved_calibration(self) -> Path:
        """The calibration file, checked to exist; relative paths are taken from the
        working directory, like mergekit's own model paths."""
        path = Path(self.calibration).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"parameters.calibration: file not found: {self.calibration!r} "
                f"(resolved to {path.resolve()})"
            )
        return path.resolve()

    def fingerprint_fields(self) -> Dict[str, Any]:
        """Fields that change the result (the cache location does not)."""
        return self.model_dump(exclude={"cache_dir", "calibration"})


def parameter_descriptions() -> Dict[str, str]:
    return {
        name: field.description or "" for name, field in FrankWolfeParameters.model_fields.items()
    }


def parse_parameters(raw: Optional[Mapping[str, Any]], *, source: str = "config") -> FrankWolfeParameters:
    """Validate a ``parameters:`` block, naming the offending field on failure."""
    raw = dict(raw or {})
    for key, value in raw.items():
        if isinstance(value, (list, dict)):
            raise ConfigError(
                f"{source}: parameters.{key}: frank_wolfe takes a single scalar value here, "
                f"not {type(value).__name__} (per-tensor filters and gradients are not supported)"
            )
    try:
        return FrankWolfeParameters.model_validate(raw)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            field = ".".join(str(p) for p in item["loc"]) or "parameters"
            if item["type"] == "extra_forbidden":
                known = ", ".join(FrankWolfeParameters.model_fields)
                problems.append(f"parameters.{field}: unknown parameter for frank_wolfe (known: {known})")
            else:
                problems.append(f"parameters.{field}: {item['msg']} (got {item.get('input')!r})")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None
