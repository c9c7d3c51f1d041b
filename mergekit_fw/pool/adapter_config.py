"""What a PEFT ``adapter_config.json`` says, checked against the adapter's own tensors.

A community adapter whose config contradicts its tensors (a rank that is not the
factors', a target list that does not name the modules it has factors for, a
``lora_alpha`` that is a string) is refused by PEFT when it loads, or loaded at a
scale one of the two got wrong. Every field that decides the maths is read here,
typed, and checked against the tensors before any maths; each refusal names the
adapter, the file, the field and both values. Which modules a config targets and
which rank and alpha pattern applies are decided by PEFT's own functions
(``check_target_module_exists``, ``get_pattern_key``), not a copy of their rules.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mergekit_fw.pool.references import PoolError

LOG = logging.getLogger(__name__)

# transformers models whose projections are ``Conv1D`` (weights stored in x out):
# PEFT sets ``fan_in_fan_out`` true for these and false for ``nn.Linear``, whatever the config says
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})

# fields that change what the adapter computes in ways a weight delta of B @ A cannot hold;
# refused when set to anything but their off value
UNSUPPORTED_WHEN_SET: dict[str, str] = {
    "use_dora": "DoRA rescales every weight column by a trained magnitude vector, so the merge is not base + scale * B @ A",
    "lora_bias": "the trained lora_B bias adds a term a weight merge does not carry",
    "layer_replication": "it changes the model's depth by repeating layers",
    "target_parameters": "LoRA on raw nn.Parameters (MoE experts) is not read here",
    "trainable_token_indices": "trained token rows are not read here",
    "use_qalora": "QALoRA pools the inputs of lora_A, so the delta is not B @ A",
    "alora_invocation_tokens": "an activated LoRA applies only after its invocation tokens; merging it changes every token",
    "use_bdlora": "block-diagonal LoRA factors are not read here",
    "kasa_config": "KaSA rewrites the base weight and adds a trained diagonal",
    "arrow_config": "Arrow routes between adapters per token",
    "monteclora_config": "MonteCLoRA samples its factors",
}
# initialisations that rewrite the base weights: unless converted when saved, the adapter
# is relative to that rewritten base, not to ours (PEFT loads it the same way; we warn)
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
BIAS_VALUES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of an ``adapter_config.json`` that decide the maths, typed."""

    file: Path
    r: int = 8
    lora_alpha: float = 8.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)
    # PEFT keeps a tied pair tied through modules_to_save (one copy for both): its merge keeps the tie
    ensure_weight_tying: bool = False
    base_model_name_or_path: str | None = None  # what it says it was trained on (a warning when not ours)

    def rank_of(self, module: str) -> int:
        """PEFT's rank for ``module``: the first ``rank_pattern`` key matching its name's end, else ``r``."""
        key = _pattern_key(self.rank_pattern, module)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_of(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scale_of(self, module: str, rank: int) -> float:
        return self.alpha_of(module) / (math.sqrt(rank) if self.use_rslora else rank)

    def rank_source(self, module: str) -> str:
        """Which field gave ``module`` its rank, for messages."""
        key = _pattern_key(self.rank_pattern, module)
        return "r" if key is None else f"rank_pattern[{key!r}]"

    # PEFT's matcher reads these attributes; LoRA on raw parameters is refused when read
    target_parameters = None

    def targets(self, module: str, *, linear: bool) -> bool:
        """Whether PEFT puts a LoRA layer on ``module`` (its name in the model, e.g.
        ``model.layers.0.self_attn.q_proj``): PEFT's own matcher. ``linear``: a linear
        layer other than the output head, what ``all-linear`` expands to."""
        from peft.tuners.tuners_utils import check_target_module_exists

        if self.target_modules is None:
            return False
        if self.target_modules == "all-linear":
            # PEFT expands it to the layers' short names, so layers_to_transform still applies
            short = module.rsplit(".", 1)[-1]
            return linear and bool(check_target_module_exists(replace(self, target_modules=[short]), module))
        return bool(check_target_module_exists(self, module))

    def describe_targets(self) -> str:
        parts = [f"target_modules = {self.target_modules!r}"]
        for name in ("exclude_modules", "layers_to_transform", "layers_pattern"):
            value = getattr(self, name)
            if value not in (None, [], ""):
                parts.append(f"{name} = {value!r}")
        return ", ".join(parts)


def _pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's pattern lookup (``get_pattern_key``), ``None`` where no key matches."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return key if key in patterns else None


class _Reader:
    """Typed reads of one config's fields; a wrong type is refused naming the field and value."""

    def __init__(self, name: str, file: Path, raw: dict):
        self.name, self.file, self.raw = name, file, raw

    def refuse(self, field_name: str, problem: str) -> PoolError:
        return PoolError(f"candidate {self.name}: {self.file}: {field_name} = {self.raw.get(field_name)!r}: {problem}")

    def number(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.refuse(key, "must be a finite number")
        return float(value)

    def rank(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PoolError(f"candidate {self.name}: {self.file}: {key} = {value!r}: must be a positive integer")
        return value

    def flag(self, key: str) -> bool:
        value = self.raw.get(key, False)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self.refuse(key, "must be true or false")
        return value

    def names(self, key: str, *, regex: bool, regex_items: bool = False) -> str | list[str] | None:
        """A string (a regular expression when ``regex``) or a list of names (each one
        put into PEFT's regular expressions when ``regex_items``)."""
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            if regex:
                self.compiles(key, value)
            return value
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            for item in value if regex_items else ():
                self.compiles(key, item)
            return list(value)
        raise self.refuse(key, "must be a string or a list of strings")

    def compiles(self, key: str, pattern: str) -> None:
        try:
            re.compile(pattern)
        except re.error as error:
            raise self.refuse(key, f"{pattern!r} is not a valid regular expression ({error})") from None

    def pattern(self, key: str, value_kind: str) -> dict:
        value = self.raw.get(key) or {}
        if not isinstance(value, dict):
            raise self.refuse(key, "must be an object mapping module names to values")
        out: dict = {}
        for module, item in value.items():
            self.compiles(key, module)
            if value_kind == "rank":
                out[module] = self.rank(f"{key}[{module!r}]", item)
            elif isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                raise PoolError(
                    f"candidate {self.name}: {self.file}: {key}[{module!r}] = {item!r}: must be a finite number"
                )
            else:
                out[module] = float(item)
        return out


def read_adapter_config(name: str, file: Path) -> AdapterConfig:
    """The config, typed, or a :class:`PoolError` naming the field that PEFT would
    refuse or that a weight merge cannot hold."""
    try:
        raw = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise PoolError(f"candidate {name}: {file}: not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise PoolError(f"candidate {name}: {file}: not valid JSON ({error.msg})") from None
    if not isinstance(raw, dict):
        raise PoolError(f"candidate {name}: {file}: expected a JSON object")
    reader = _Reader(name, file, raw)
    if raw.get("peft_type", "LORA") != "LORA":
        raise reader.refuse("peft_type", "only LORA adapters are read")
    for key, why in UNSUPPORTED_WHEN_SET.items():
        if raw.get(key) not in (None, False, [], {}, ""):
            raise reader.refuse(key, f"not supported: {why}")
    bias = raw.get("bias", "none")
    if bias not in BIAS_VALUES:
        raise reader.refuse("bias", f"must be one of {', '.join(BIAS_VALUES)}")
    if bias != "none":
        raise reader.refuse("bias", "trained biases are not merged (only 'none' is supported)")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        LOG.warning(
            "candidate %s: %s: init_lora_weights = %r rewrites the base weights; unless the adapter was converted "
            "when saved, its delta is relative to that rewritten base (PEFT loads it the same way)",
            name,
            file,
            init,
        )
    layers = raw.get("layers_to_transform")
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool))
        or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))
    ):
        raise reader.refuse("layers_to_transform", "must be an integer or a list of integers")
    modules_to_save = raw.get("modules_to_save") or []
    if not isinstance(modules_to_save, list) or not all(isinstance(m, str) for m in modules_to_save):
        raise reader.refuse("modules_to_save", "must be a list of module names")
    for module in modules_to_save:  # PEFT puts each into a regular expression
        reader.compiles("modules_to_save", module)
    config = AdapterConfig(
        file=file,
        r=reader.rank("r", raw.get("r", 8)),
        lora_alpha=reader.number("lora_alpha", 8.0),
        rank_pattern=reader.pattern("rank_pattern", "rank"),
        alpha_pattern=reader.pattern("alpha_pattern", "alpha"),
        use_rslora=reader.flag("use_rslora"),
        fan_in_fan_out=reader.flag("fan_in_fan_out"),
        target_modules=reader.names("target_modules", regex=True),
        exclude_modules=reader.names("exclude_modules", regex=True),
        layers_to_transform=layers,
        layers_pattern=reader.names("layers_pattern", regex=True, regex_items=True),
        modules_to_save=list(modules_to_save),
        ensure_weight_tying=reader.flag("ensure_weight_tying"),
        base_model_name_or_path=str(raw["base_model_name_or_path"]) if raw.get("base_model_name_or_path") else None,
    )
    _peft_accepts(name, file, raw)
    return config


def _peft_accepts(name: str, file: Path, raw: dict) -> None:
    """PEFT's own checks of a config (``LoraConfig.__post_init__``: a regex target with
    layer indices, ``layers_pattern`` without ``layers_to_transform`` and the like), run
    on the fields this PEFT knows; its refusal is ours, with its words."""
    from peft import LoraConfig

    known = {f.name for f in fields(LoraConfig) if f.init and f.name not in ("peft_type", "runtime_config")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            LoraConfig(**{key: value for key, value in raw.items() if key in known})
        except (TypeError, ValueError, KeyError, AttributeError, ImportError) as error:
            raise PoolError(f"candidate {name}: {file}: PEFT refuses this config: {error}") from None


def with_default_targets(name: str, config: AdapterConfig, base_config: dict) -> AdapterConfig:
    """A config without ``target_modules`` targets what PEFT picks for the model type."""
    if config.target_modules is not None:
        return config
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = base_config.get("model_type")
    if model_type not in DEFAULTS:
        raise PoolError(
            f"candidate {name}: {config.file}: target_modules is not set and PEFT has no default for "
            f"model_type {model_type!r} (it refuses such an adapter)"
        )
    return replace(config, target_modules=list(DEFAULTS[model_type]))


def conv1d_layout(base_config: dict, tensor: str) -> bool:
    """Whether the base stores ``tensor`` as a ``Conv1D`` weight (in x out), which is
    what decides PEFT's ``fan_in_fan_out`` for it."""
    if base_config.get("model_type") not in CONV1D_MODEL_TYPES:
        return False
    return not any(part in tensor for part in ("lm_head", "wte", "wpe", "embed"))


def modules_of(tensors: list[str]) -> list[str]:
    """Every module of a model with these tensors: each tensor's owner and their parents
    (``model.layers.0.self_attn`` as well as its ``q_proj``), as PEFT walks them."""
    out: set[str] = set()
    for tensor in tensors:
        parts = tensor.split(".")[:-1]
        out.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return sorted(out)


def check_coverage(name: str, config: AdapterConfig, base_tensors: list[str], adapted: set[str]) -> None:
    """The converse of :func:`check_module`: every module the config targets has
    factors in the file. PEFT would put a LoRA on such a module anyway (a fresh one, or
    an error for a module it cannot adapt), so its merge and ours would differ."""
    linear = {t.rsplit(".", 1)[0] for t in base_tensors if t.endswith(".weight")}
    for module in modules_of(base_tensors):
        if module in adapted:
            continue
        is_linear = module in linear and not any(p in module for p in ("lm_head", "embed", "wte", "wpe"))
        if config.targets(module, linear=is_linear):
            raise PoolError(
                f"candidate {name}: {config.file}: {config.describe_targets()} covers {module}, but "
                "adapter_model.safetensors has no LoRA factors for it (PEFT would add an untrained or "
                "unsupported LoRA there)"
            )


def check_module(
    name: str,
    config: AdapterConfig,
    module: str,
    rank: int,
    *,
    conv1d: bool,
    linear: bool,
) -> None:
    """The module's factors against the config: PEFT must target it, at this rank,
    with the layout its ``fan_in_fan_out`` says."""
    where = f"candidate {name}: {config.file}"
    if not config.targets(module, linear=linear):
        raise PoolError(
            f"{where}: {config.describe_targets()} does not cover {module}, for which adapter_model.safetensors has "
            "LoRA factors (PEFT would leave them out; a merge would apply them)"
        )
    expected = config.rank_of(module)
    if rank != expected:
        raise PoolError(
            f"{where}: {config.rank_source(module)} = {expected} for {module}, but its lora_A/lora_B have rank {rank} "
            "(PEFT refuses to load it)"
        )
    if config.fan_in_fan_out != conv1d:
        layout = "Conv1D (in x out)" if conv1d else "nn.Linear (out x in)"
        raise PoolError(
            f"{where}: fan_in_fan_out = {str(config.fan_in_fan_out).lower()}, but the base stores {module} as "
            f"{layout}, for which it is {str(conv1d).lower()} (PEFT overrides it; fix the config)"
        )
