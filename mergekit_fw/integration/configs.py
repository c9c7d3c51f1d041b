"""mergekit configs into what the rest of the package reads: a pool spec and settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from mergekit_fw import METHOD_NAME
from mergekit_fw.config import ConfigError, FrankWolfeParameters, parse_parameters
from mergekit_fw.pool.references import CandidateSpec, ModelSource, PoolSpec

SUPPORTED_MERGEKIT = "0.1.5"


def model_source(path: Any) -> ModelSource:
    """A mergekit ``ModelPath`` as a plain model source."""
    return ModelSource(path=str(path.path), revision=path.revision)


def reference_name(reference: Any) -> str:
    """mergekit's own string for a model reference (``BASE+ADAPTER`` for LoRAs)."""
    return str(reference)


def candidate_spec(reference: Any) -> CandidateSpec:
    """One pool member from a mergekit ``ModelReference``."""
    return CandidateSpec(
        name=reference_name(reference),
        model=model_source(reference.model),
        lora=model_source(reference.lora) if reference.lora else None,
    )


def load_merge_config(config_file: Path) -> Any:
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


def pool_and_parameters(
    merge_config: Any, source: str = "config", *, trust_remote_code: bool = False
) -> tuple[PoolSpec, FrankWolfeParameters]:
    """The pool and settings a ``frank_wolfe`` config describes, fully validated.
    ``trust_remote_code``: mergekit's option of that name, as the user passed it."""
    where = source
    if merge_config.merge_method != METHOD_NAME:
        raise ConfigError(f"{where}: merge_method is {merge_config.merge_method!r}, expected {METHOD_NAME!r}")
    if merge_config.slices or merge_config.modules:
        raise ConfigError(f"{where}: frank_wolfe merges whole models: use models:, not slices: or modules:")
    if merge_config.base_model is None:
        raise ConfigError(f"{where}: base_model: frank_wolfe needs the base model the candidates were tuned from")
    params = parse_parameters(merge_config.parameters, source=where)
    tokenizer = getattr(merge_config, "tokenizer", None)
    align_vocab = False
    for key, value in (
        ("tokenizer_source", getattr(merge_config, "tokenizer_source", None)),
        ("tokenizer.source", getattr(tokenizer, "source", None)),
    ):
        if value is None:
            continue
        if str(value) != "base":
            raise ConfigError(
                f"{where}: {key}: {value}: frank_wolfe merges on the base model's vocabulary; use 'base' (candidates "
                "with other vocabularies are aligned to it by token) or leave it out"
            )
        align_vocab = True
    if tokenizer is not None and getattr(tokenizer, "tokens", None):
        raise ConfigError(f"{where}: tokenizer.tokens: per-token embedding sources are not supported by frank_wolfe")
    candidates = []
    for index, model_in in enumerate(merge_config.models or []):
        if model_in.parameters:
            keys = ", ".join(model_in.parameters)
            raise ConfigError(
                f"{where}: models[{index}].parameters ({keys}): frank_wolfe chooses per-model "
                "weights itself and takes no per-model parameters"
            )
        reference = model_in.model
        if reference == merge_config.base_model:
            continue  # listing the base among the models is harmless: it is a vertex anyway
        candidates.append(candidate_spec(reference))
    if merge_config.base_model.lora:
        raise ConfigError(f"{where}: base_model must be a plain model, not BASE+LORA")
    return PoolSpec(
        base=model_source(merge_config.base_model.model),
        candidates=tuple(candidates),
        align_vocab=align_vocab,
        dtype=str(torch_dtype(merge_config.dtype)).removeprefix("torch.") if merge_config.dtype else None,
        trust_remote_code=trust_remote_code,
    ), params


def config_models(merge_config: Any) -> tuple[str | None, list]:
    """(base reference string, [model reference strings]) of any mergekit config."""
    base = reference_name(merge_config.base_model) if merge_config.base_model is not None else None
    return base, [reference_name(m) for m in merge_config.referenced_models() if reference_name(m) != base]


def torch_dtype(name: str) -> torch.dtype:
    from mergekit.common import dtype_from_name

    return dtype_from_name(name)


def output_dtype(merge_config: Any) -> torch.dtype | None:
    """mergekit's rule: out_dtype, else dtype, else the base's own dtype (None)."""
    name = merge_config.out_dtype or merge_config.dtype
    return torch_dtype(name) if name else None


def parse_size(value: str) -> int:
    from mergekit.common import parse_kmb

    try:
        return int(parse_kmb(value))
    except Exception:
        raise ConfigError(f"--out-shard-size: cannot parse {value!r} (use e.g. 500M or 5B)") from None
