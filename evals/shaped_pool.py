"""A LLaMA-7B-*shaped* pool built locally: real widths, few layers, random weights.

The benchmarks and the scale tests need tensors of the sizes users merge (hidden
4096, intermediate 11008, 32 heads, vocabulary 32000) without downloading 13 GB,
so the base keeps Llama-2-7B's shapes and takes 2 decoder layers (~0.67 B
parameters, 1.3 GB in bf16). Weights are seeded random: these pools measure
memory and time, never quality. Adapters are real PEFT folders (PEFT's own
``LoraConfig`` file, its tensor naming) with mixed ranks over all seven linear
modules, as community LoRAs for Llama come.

Everything is cached on disk under the given root and keyed by its settings.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from safetensors.torch import save_file

LLAMA_7B_SHAPE = dict(
    hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (8, 16, 32, 16)  # cycled over the adapters
_DONE = ".complete"


def build_base(folder: Path, *, layers: int = 2, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
               shard_bytes: int | None = None) -> Path:
    """Config, tokenizer and safetensors written tensor by tensor (the model is
    never instantiated). ``shard_bytes``: shards of at most that size with
    ``model.safetensors.index.json``, as the hub checkpoints come (Llama-2-7b-hf: two
    shards under 10 GB), so building holds one shard; else one file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from testbed.build import SIX as SKILLS, build_tokenizer

    folder = Path(folder)
    if (folder / _DONE).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=layers, **LLAMA_7B_SHAPE)
    config.dtype = dtype
    config.architectures = ["LlamaForCausalLM"]  # mergekit reads the architecture from here
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).state_dict().items()}
    limit = shard_bytes or sum(torch.Size(shape).numel() * dtype.itemsize for shape in shapes.values())
    groups: List[List[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map: Dict[str, str] = {}
    for number, names in enumerate(groups, start=1):
        file = "model.safetensors" if len(groups) == 1 else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        state: Dict[str, torch.Tensor] = {}
        for name in names:
            shape = shapes[name]
            if name.endswith("norm.weight"):
                state[name] = torch.ones(shape, dtype=dtype)
            else:
                state[name] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            weight_map[name] = file
        save_file(state, str(folder / file), metadata={"format": "pt"})
        del state
    if len(groups) > 1:
        total = sum(torch.Size(shape).numel() * dtype.itemsize for shape in shapes.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(str(folder))
    build_tokenizer(folder, list(SKILLS))
    (folder / _DONE).write_text("")
    return folder


@dataclass(frozen=True)
class AdapterShape:
    """What one community LoRA looks like: its modules, rank, scaling and file dtype."""

    targets: Tuple[str, ...] = TARGETS
    rank: int = 16
    dtype: torch.dtype = torch.float32
    rslora: bool = False
    modules_to_save: Tuple[str, ...] = ()


def build_adapter(base: Path, folder: Path, *, index: int, layers: int = 2, seed: int = 0,
                  shape: AdapterShape | None = None) -> Path:
    """One PEFT LoRA: by default over every linear module, rank from ``RANKS``, fp32
    factors; ``shape`` sets modules, rank, rsLoRA, ``modules_to_save`` and file dtype."""
    from peft import LoraConfig

    folder = Path(folder)
    if (folder / _DONE).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    shape = shape or AdapterShape(rank=RANKS[index % len(RANKS)])
    rank = shape.rank
    hidden, inter = LLAMA_7B_SHAPE["hidden_size"], LLAMA_7B_SHAPE["intermediate_size"]
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}
    generator = torch.Generator().manual_seed(seed * 1000 + index)
    tensors: Dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for module in shape.targets:
            out_features, in_features = dims[module]
            block = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_features, generator=generator)
                                                  / in_features**0.5).to(shape.dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator) * 0.01).to(shape.dtype)
    for module in shape.modules_to_save:  # a retrained full module, as PEFT saves it
        if module != "lm_head":
            raise ValueError(f"modules_to_save: only lm_head is built, not {module}")
        head = torch.randn(LLAMA_7B_SHAPE["vocab_size"], hidden, generator=generator) * 0.02
        tensors["base_model.model.lm_head.weight"] = head.to(shape.dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(shape.targets), use_rslora=shape.rslora,
               modules_to_save=list(shape.modules_to_save) or None,
               base_model_name_or_path=str(base)).save_pretrained(str(folder))
    (folder / _DONE).write_text("")
    return folder


def write_calibration(path: Path, *, tasks: Sequence[str] = ("reverse", "sort"), samples: int = 4,
                      length: int = 24, seed: int = 0) -> Path:
    """Symbol-task rows of about ``length + 10`` tokens each."""
    from testbed.tasks import BY_NAME, SYMBOLS

    rng = random.Random(seed)
    rows: List[str] = []
    for task in tasks:
        for _ in range(samples):
            seq = [rng.choice(SYMBOLS) for _ in range(length)]
            answer = " ".join(BY_NAME[task].answer(seq[:8]))  # type: ignore[misc]
            rows.append(json.dumps({"task": task, "prompt": f"{task} {' '.join(seq)} =", "completion": " " + answer}))
    path.write_text("\n".join(rows) + "\n")
    return path


def build_pool(root: Path, n_adapters: int, *, layers: int = 2, seed: int = 0) -> Dict[str, object]:
    """The base, the first ``n_adapters`` adapters and a calibration file."""
    root = Path(root)
    base = build_base(root / f"base-{layers}l", layers=layers, seed=seed)
    adapters = [build_adapter(base, root / f"adapters-{layers}l" / f"lora{i:03d}", index=i, layers=layers, seed=seed)
                for i in range(n_adapters)]
    calibration = write_calibration(root / "calib.jsonl", seed=seed)
    return {"base": base, "adapters": adapters, "calibration": calibration}


def fw_config(pool: Dict[str, object], **parameters: object) -> dict:
    """A ``frank_wolfe`` mergekit config over the pool (bf16 output, bf16 oracle)."""
    base = str(pool["base"])
    return {
        "merge_method": "frank_wolfe",
        "base_model": base,
        "models": [{"model": f"{base}+{adapter}"} for adapter in pool["adapters"]],  # type: ignore[union-attr]
        "parameters": {"calibration": str(pool["calibration"]), "samples_per_task": 4, "batch_size": 4,
                       "max_length": 64, "oracle_dtype": "bfloat16", **parameters},
        "dtype": "bfloat16",
    }


def task_arithmetic_config(pool: Dict[str, object], weight: float = 0.3) -> dict:
    base = str(pool["base"])
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": weight}} for adapter in pool["adapters"]],  # type: ignore[union-attr]
        "dtype": "bfloat16",
    }


@dataclass
class Shaped:
    """The shaped pool opened as a benchmark times it: the config, the pool, the base
    model the oracle uses and the calibration batches."""

    dirs: Dict[str, object]
    config_file: Path
    spec: object
    params: object
    pool: object
    model: object
    calibration: object


def open_shaped(root: Path, n_adapters: int, work: Path, **parameters: object) -> Shaped:
    """Build (or reuse) the pool under ``root``, write a ``frank_wolfe`` config with
    ``parameters`` into ``work`` and open everything the oracle needs."""
    import yaml

    from mergekit_fw.calibration.batches import build_calibration
    from mergekit_fw.distributed import Processes
    from mergekit_fw.integration.configs import load_merge_config, pool_and_parameters
    from mergekit_fw.pool.pool import open_pool
    from mergekit_fw.solve.runner import load_base_model

    dirs = build_pool(root, n_adapters)
    config_file = Path(work) / "fw.yml"
    config_file.write_text(yaml.safe_dump(fw_config(dirs, **parameters)))
    spec, params = pool_and_parameters(load_merge_config(config_file))
    pool = open_pool(spec)
    model, tokenizer = load_base_model(pool, params, Processes(), spec.dtype)
    calibration = build_calibration(dirs["calibration"], tokenizer, samples_per_task=params.samples_per_task,
                                    batch_size=params.batch_size, max_length=params.max_length)
    return Shaped(dirs, config_file, spec, params, pool, model, calibration)
