"""The candidates' tensors: PEFT LoRA factors kept resident, dense checkpoints
served lazily one tensor at a time, each checked to fit the base it moves."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open

from mergekit_fw.pool.adapter_config import (
    AdapterConfig,
    check_coverage,
    check_module,
    conv1d_layout,
    read_adapter_config,
    with_default_targets,
)
from mergekit_fw.pool.references import PoolError
from mergekit_fw.pool.safetensors_io import (
    SafetensorsFormatError,
    StoredTensor,
    read_layout,
)
from mergekit_fw.pool.vocab import VocabularyError, align_rows, vocab_map

LOG = logging.getLogger(__name__)


class SafetensorsIndex:
    """Tensor name -> file for a (possibly sharded) safetensors checkpoint."""

    def __init__(self, folder: Path, what: str):
        self.folder = folder
        self.what = what
        index_file = folder / "model.safetensors.index.json"
        self.files: dict[str, Path] = {}
        self._layouts: dict[Path, dict[str, StoredTensor]] = {}
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PoolError(f"{what} {index_file}: not a safetensors index (no weight_map)") from None
            self.files = {name: folder / shard for name, shard in weight_map.items()}
            for shard in sorted(set(self.files.values())):
                if not shard.is_file():
                    raise PoolError(f"{what} {shard}: listed in {index_file.name} but missing (incomplete download?)")
                missing = [n for n, f in self.files.items() if f == shard and n not in self._layout(shard)]
                if missing:
                    raise PoolError(f"{what} {shard}: lacks {missing[0]!r}, which {index_file.name} places there")
        else:
            shards = sorted(folder.glob("*.safetensors"))
            shards = [s for s in shards if not s.name.startswith("adapter_model")]
            if not shards:
                raise PoolError(f"{what} {folder}: no .safetensors weights found")
            for shard in shards:
                for name in self._layout(shard):
                    self.files[name] = shard
        # names this checkpoint does not store because the model ties them to a stored
        # tensor (a tied lm_head -> its input embeddings): readable under either name, and
        # listed among the checkpoint's tensors only once a merge unties them
        self.tied: dict[str, str] = {}
        self.untied: list[str] = []

    def _layout(self, shard: Path) -> dict[str, StoredTensor]:
        """The shard's header, read once; a truncated or corrupt file is named here."""
        if shard not in self._layouts:
            try:
                self._layouts[shard] = read_layout(shard)
            except SafetensorsFormatError as error:
                raise PoolError(f"{self.what.rstrip(':')}: {error}") from None
        return self._layouts[shard]

    def names(self) -> list[str]:
        return [*self.files, *self.untied]

    def has(self, name: str) -> bool:
        """Stored, or tied to a stored tensor."""
        return name in self.files or name in self.tied

    def tie(self, name: str, stored: str) -> None:
        """Serve ``stored``'s values under ``name`` too (the model ties the two)."""
        self.tied[name] = stored

    def untie(self, name: str) -> None:
        """List a tied name among the tensors: a merge writes it apart from its twin."""
        if name not in self.tied:
            raise ValueError(f"{self.what} {self.folder}: {name!r} is not tied to a stored tensor")
        if name not in self.untied:
            self.untied.append(name)

    def where(self, name: str) -> tuple[Path, str]:
        """The file and key holding ``name``'s values."""
        key = name if name in self.files else self.tied.get(name, name)
        try:
            return self.files[key], key
        except KeyError:
            raise PoolError(f"{self.what} {self.folder}: has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.stored(name).spec.shape

    def get(self, name: str) -> torch.Tensor:
        shard, key = self.where(name)
        with safe_open(str(shard), framework="pt") as handle:
            return handle.get_tensor(key)

    def weight_files(self) -> list[Path]:
        return sorted(set(self.files.values()))

    def stored(self, name: str) -> StoredTensor:
        """Where ``name``'s bytes are in its shard (for copying them unchanged); a tied
        name's are its twin's."""
        shard, key = self.where(name)
        stored = self._layout(shard)[key]
        if key == name:
            return stored
        return replace(stored, spec=replace(stored.spec, name=name))


HEAD = "lm_head.weight"
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def tie_head(config: dict, index: SafetensorsIndex) -> None:
    """Read the head of a checkpoint saved with ``tie_word_embeddings: true`` (it
    stores only the input embeddings) through the embeddings it shares."""
    if not config.get("tie_word_embeddings") or HEAD in index.files:
        return
    embeddings = [name for name in index.files if name.endswith(_EMBEDDINGS)]
    if len(embeddings) == 1:
        index.tie(HEAD, embeddings[0])


class LoraFactors:
    """``delta = scale * B @ A`` for one base weight.

    The factors are read from the adapter file on first use, not when the pool
    opens: the oracle copies them straight into its per-module banks and points
    ``A`` and ``B`` at slices of those, so no adapter is ever held twice.
    """

    def __init__(
        self,
        source: Path,
        key_A: str,
        key_B: str,
        scale: float,
        rank: int,
        shape: tuple[int, int],
        transpose: bool = False,
    ):
        self.source, self.key_A, self.key_B = source, key_A, key_B
        self.scale, self.rank, self.shape, self.transpose = scale, rank, shape, transpose
        self._A: torch.Tensor | None = None
        self._B: torch.Tensor | None = None

    def _load(self) -> None:
        with safe_open(str(self.source), framework="pt") as handle:
            A = handle.get_tensor(self.key_A).to(torch.float32)
            B = handle.get_tensor(self.key_B).to(torch.float32)
        if self.transpose:  # fan_in_fan_out: delta = (B @ A).T, stored as the factors of the transpose
            A, B = B.T.contiguous(), A.T.contiguous()
        self._A, self._B = A, B

    @property
    def A(self) -> torch.Tensor:  # (r, in)
        if self._A is None:
            self._load()
        return self._A  # type: ignore[return-value]

    @property
    def B(self) -> torch.Tensor:  # (out, r)
        if self._B is None:
            self._load()
        return self._B  # type: ignore[return-value]

    @property
    def loaded(self) -> bool:
        return self._A is not None

    def share(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Use these tensors (slices of a bank, same values) from now on."""
        self._A, self._B = A, B

    def release(self) -> None:
        """Forget the loaded factors (a bank in another dtype or on another device
        holds them now); they are read again from the file if asked for."""
        self._A = self._B = None

    def nbytes(self) -> int:
        return 4 * self.rank * (self.shape[0] + self.shape[1])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scale

    def frobenius_norm(self) -> float:
        """||scale * B @ A||_F from r x r Gram matrices, never the dense product."""
        A, B = self.A.to(torch.float64), self.B.to(torch.float64)
        squared = float(((B.T @ B) * (A @ A.T)).sum())
        return abs(self.scale) * max(squared, 0.0) ** 0.5


@dataclass
class LoraCandidate:
    """A PEFT adapter: low-rank factors per targeted weight, plus the full tensors
    of its ``modules_to_save`` (e.g. a retrained ``lm_head``), which are dense deltas."""

    name: str
    adapter_dir: Path
    factors: dict[str, LoraFactors]  # keyed by base tensor name
    full: dict[str, str] = field(default_factory=dict)  # base tensor name -> key in the adapter file
    vocab_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # aligned full tensors (tokenizer_source: base)
    config: AdapterConfig | None = None  # its adapter_config.json, checked against the factors

    kind = "lora"

    @property
    def weights_file(self) -> Path:
        return self.adapter_dir / "adapter_model.safetensors"

    def tensor_names(self) -> list[str]:
        return [*self.factors, *self.full]

    def dense_tensor_names(self) -> list[str]:
        return list(self.full)

    def is_low_rank(self, tensor: str) -> bool:
        return tensor in self.factors

    def source_of(self, tensor: str) -> tuple[Path, str]:
        """The file and key holding ``tensor``'s full value (modules_to_save only)."""
        return self.weights_file, self.full[tensor]

    def delta(self, tensor: str, base: torch.Tensor | None = None) -> torch.Tensor | None:
        factors = self.factors.get(tensor)
        if factors is not None:
            return factors.delta()
        if tensor not in self.full:
            return None
        if base is None:
            raise ValueError(f"candidate {self.name}: the delta of {tensor} (modules_to_save) needs the base tensor")
        with safe_open(str(self.weights_file), framework="pt") as handle:
            value = handle.get_tensor(self.full[tensor])
        if tensor in self.vocab_maps:
            value = align_rows(value, self.vocab_maps[tensor], base)
        dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
        return value.to(dtype) - base.to(dtype)

    def files(self) -> list[Path]:
        return [self.adapter_dir / "adapter_config.json", self.weights_file]

    def nbytes(self) -> int:
        """Resident bytes of the factors (float32) once loaded."""
        return sum(f.nbytes() for f in self.factors.values())


@dataclass
class DenseCandidate:
    name: str
    folder: Path
    index: SafetensorsIndex
    touched: list[str] = field(default_factory=list)
    vocab_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # aligned tensors (tokenizer_source: base)

    kind = "dense"

    def tensor_names(self) -> list[str]:
        return self.touched

    def dense_tensor_names(self) -> list[str]:
        return self.touched

    def is_low_rank(self, tensor: str) -> bool:
        return False

    def source_of(self, tensor: str) -> tuple[Path, str]:
        return self.index.where(tensor)

    def delta(self, tensor: str, base: torch.Tensor | None) -> torch.Tensor | None:
        if not self.index.has(tensor):
            return None
        if base is None:
            raise ValueError(f"candidate {self.name}: the delta of dense tensor {tensor} needs the base tensor")
        dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
        value = self.index.get(tensor)
        if tensor in self.vocab_maps:
            value = align_rows(value, self.vocab_maps[tensor], base)
        return value.to(dtype) - base.to(dtype)

    def files(self) -> list[Path]:
        return [self.folder / "config.json", *self.index.weight_files()]


Candidate = LoraCandidate | DenseCandidate


def _vocab_rows(tensor: str, shape: tuple[int, ...], base_shape: tuple[int, ...]) -> bool:
    """An embedding or output head whose row count is the vocabulary's."""
    return (
        len(shape) == 2
        and shape[1:] == base_shape[1:]
        and ("embed" in tensor or "lm_head" in tensor or "wte" in tensor)
    )


def _aligned_map(name: str, folder: Path, align_to: Path | None, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    if "map" not in cache:
        try:
            cache["map"] = vocab_map(align_to, folder, f"candidate {name}:")  # type: ignore[arg-type]
        except VocabularyError as error:
            raise PoolError(str(error)) from None
    return cache["map"]


def load_lora(
    name: str, adapter_dir: Path, base_config: dict, base_index: SafetensorsIndex, align_to: Path | None = None
) -> LoraCandidate:
    """The adapter's factors, after its config has been checked against them
    (:mod:`mergekit_fw.pool.adapter_config`) and their shapes against the base."""
    config_file = adapter_dir / "adapter_config.json"
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file():
        raise PoolError(f"candidate {name}: {config_file} not found (is it a PEFT adapter folder?)")
    if not weights_file.is_file():
        raise PoolError(f"candidate {name}: {weights_file} not found")
    try:
        read_layout(weights_file)
    except SafetensorsFormatError as error:
        raise PoolError(f"candidate {name}: {error}") from None
    config = with_default_targets(name, read_adapter_config(name, config_file), base_config)
    modules_to_save = config.modules_to_save

    pairs: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    full: dict[str, str] = {}
    vocab_maps: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    with safe_open(str(weights_file), framework="pt") as handle:
        for key in handle.keys():
            match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
            if config.ensure_weight_tying and key.removeprefix("base_model.model.") in base_index.tied:
                continue  # the tied head's copy of the saved embeddings: PEFT keeps the two one tensor
            _refuse_lora_on_tied(name, weights_file, key, base_index)
            saved = _saved_module_tensor(key, modules_to_save)
            if saved is not None:
                shape = tuple(handle.get_slice(key).get_shape())
                if (
                    align_to is not None
                    and base_index.has(saved)
                    and shape != base_index.shape(saved)
                    and _vocab_rows(saved, shape, base_index.shape(saved))
                ):
                    vocab_maps[saved] = _aligned_map(name, adapter_dir, align_to, shared)
                else:
                    _check_full_tensor(name, weights_file, key, saved, shape, base_index)
                full[saved] = key
                continue
            if "lora_embedding" in key:
                raise PoolError(
                    f"candidate {name}: {config_file}: target_modules = {config.target_modules!r} puts a LoRA on an "
                    f"embedding ({key!r} in {weights_file.name}); embedding LoRAs are not supported"
                )
            if "lora_magnitude" in key or match is None:
                raise PoolError(f"candidate {name}: {weights_file}: unsupported adapter tensor {key!r}")
            module, which = match.group(1), match.group(2)
            pairs.setdefault(module, {})[which] = (key, tuple(handle.get_slice(key).get_shape()))

    factors: dict[str, LoraFactors] = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise PoolError(f"candidate {name}: {weights_file}: module {module} lacks lora_A or lora_B")
        tensor = f"{module}.weight"
        if tensor not in base_index.files:
            tied = (
                f" (the base ties it to {base_index.tied[tensor]} and stores it once; a LoRA on a tied "
                "weight is not supported: save the module whole with modules_to_save instead)"
                if tensor in base_index.tied
                else ""
            )
            raise PoolError(
                f"candidate {name}: {weights_file}: targets {module}, but the base has no tensor {tensor!r}{tied}"
            )
        (key_A, shape_A), (key_B, shape_B) = pair["lora_A"], pair["lora_B"]
        if len(shape_A) != 2 or len(shape_B) != 2:
            kind = "a convolution LoRA" if len(shape_A) > 2 else "LoRA factors that are not matrices"
            raise PoolError(
                f"candidate {name}: {config_file}: target_modules = {config.target_modules!r} puts {kind} on {module} "
                f"(lora_A {shape_A}, lora_B {shape_B} in {weights_file.name}); only linear layers are supported"
            )
        rank = shape_A[0]
        if shape_B[1] != rank:
            raise PoolError(
                f"candidate {name}: {weights_file}: {module}: lora_A rank {rank} != lora_B rank {shape_B[1]}"
            )
        conv1d = conv1d_layout(base_config, tensor)
        check_module(name, config, module, rank, conv1d=conv1d, linear="lm_head" not in module)
        base_shape = base_index.shape(tensor)
        delta_shape = (shape_B[0], shape_A[1])
        if conv1d:
            delta_shape = delta_shape[::-1]
        if tuple(base_shape) != delta_shape:
            raise PoolError(
                f"candidate {name}: {weights_file}: {module}: LoRA delta shape {delta_shape} does not match "
                f"base weight {tensor} shape {tuple(base_shape)} (adapter for another base?)"
            )
        factors[tensor] = LoraFactors(
            weights_file,
            key_A,
            key_B,
            config.scale_of(module, rank),
            rank,
            (int(base_shape[0]), int(base_shape[1])),
            transpose=conv1d,
        )
    if not factors and not full:
        raise PoolError(f"candidate {name}: {weights_file}: no LoRA weights")
    check_coverage(name, config, base_index.names(), {tensor.rsplit(".", 1)[0] for tensor in factors})
    missing = [m for m in modules_to_save if not any(_module_matches(t.rsplit(".", 1)[0], m) for t in full)]
    if missing:
        raise PoolError(
            f"candidate {name}: {config_file}: modules_to_save = {config.modules_to_save!r}, but "
            f"{weights_file.name} has no tensors for {missing} (PEFT refuses to load it)"
        )
    return LoraCandidate(
        name=name, adapter_dir=adapter_dir, factors=factors, full=full, vocab_maps=vocab_maps, config=config
    )


def _refuse_lora_on_tied(name: str, weights_file: Path, key: str, base_index: SafetensorsIndex) -> None:
    """PEFT saves the base layer of a LoRA'd tied head (``lm_head.base_layer.weight``) and
    merges the LoRA into the one tensor the two share: the embeddings move with the head."""
    layer = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.base_layer\.weight", key)
    module = layer.group(1) if layer else ""
    twin = base_index.tied.get(f"{module}.weight")
    if twin is not None:
        raise PoolError(
            f"candidate {name}: {weights_file}: puts a LoRA on {module}, which the base ties to "
            f"{twin} and stores once ({key!r} is saved for it); a LoRA on a tied weight is not "
            "supported: save the module whole with modules_to_save instead"
        )


def _module_matches(module: str, pattern: str) -> bool:
    """PEFT's rule for modules_to_save entries: the module name or its last part(s)."""
    return module == pattern or module.endswith(f".{pattern}")


def _saved_module_tensor(key: str, modules_to_save: Sequence[str]) -> str | None:
    """The base tensor a ``modules_to_save`` entry of the adapter file replaces, if it is one.

    PEFT stores them under the module's own name (``base_model.model.lm_head.weight``)."""
    if not modules_to_save or ".lora_" in key:
        return None
    tensor = key.removeprefix("base_model.model.")
    tensor = tensor.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
    module = tensor.rsplit(".", 1)[0]
    return tensor if any(_module_matches(module, m) for m in modules_to_save) else None


def _check_full_tensor(
    name: str,
    weights_file: Path,
    key: str,
    tensor: str,
    shape: tuple[int, ...],
    base_index: SafetensorsIndex,
) -> None:
    if not base_index.has(tensor):  # a head the base ties to its embeddings is read through them
        raise PoolError(
            f"candidate {name}: {weights_file}: modules_to_save tensor {key!r} has no counterpart {tensor!r} in the base"
        )
    base_shape = tuple(base_index.shape(tensor))
    if shape != base_shape:
        what = (
            "vocabulary size" if ("embed" in tensor or "lm_head" in tensor) and shape[1:] == base_shape[1:] else "shape"
        )
        raise PoolError(
            f"candidate {name}: {weights_file}: modules_to_save tensor {key!r} has {what} {shape}, the base "
            f"{tensor} has {base_shape} (an extended vocabulary? set tokenizer_source: base to align it to the base's)"
        )


_ARCH_KEYS = (
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


def read_model_config(folder: Path, what: str) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise PoolError(f"{what} {folder}: config.json not found")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise PoolError(f"{what} {config_file}: not valid JSON ({error.msg})") from None


def load_dense(
    name: str, folder: Path, base_config: dict, base_index: SafetensorsIndex, align_to: Path | None = None
) -> DenseCandidate:

    config = read_model_config(folder, f"candidate {name}:")
    for key in _ARCH_KEYS:
        if key == "vocab_size" and align_to is not None:
            continue  # aligned below, tensor by tensor
        if config.get(key) != base_config.get(key):
            hint = {
                "architectures": " (a checkpoint of another architecture)",
                "vocab_size": " (a different vocabulary: set tokenizer_source: base to align it to the base's)",
            }.get(key, " (another model size)")
            raise PoolError(
                f"candidate {name}: {folder}/config.json: {key} = {config.get(key)!r}, "
                f"but the base has {base_config.get(key)!r}{hint}"
            )
    index = SafetensorsIndex(folder, f"candidate {name}:")
    tie_head(config, index)
    touched = []
    vocab_maps: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    for tensor in index.names():
        if not base_index.has(tensor):
            raise PoolError(f"candidate {name}: tensor {tensor!r} is not in the base model")
        shape, base_shape = index.shape(tensor), base_index.shape(tensor)
        if shape != base_shape:
            if align_to is not None and _vocab_rows(tensor, shape, base_shape):
                vocab_maps[tensor] = _aligned_map(name, folder, align_to, shared)
            else:
                raise PoolError(f"candidate {name}: tensor {tensor} has shape {shape}, the base {base_shape}")
        touched.append(tensor)
    return DenseCandidate(name=name, folder=folder, index=index, touched=touched, vocab_maps=vocab_maps)
