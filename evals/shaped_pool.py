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
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from safetensors.torch import save_file

LLAMA_7B_SHAPE = dict(
    hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (8, 16, 32, 16)  # cycled over the adapters
_DONE = ".complete"


def build_base(folder: Path, *, layers: int = 2, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Config, tokenizer and one safetensors file, written tensor by tensor (the
    model is never instantiated, so building needs about one tensor of memory)."""
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
    generator = torch.Generator().manual_seed(seed)
    state: Dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=dtype)
        else:
            state[name] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del state
    config.save_pretrained(str(folder))
    build_tokenizer(folder, list(SKILLS))
    (folder / _DONE).write_text("")
    return folder


def build_adapter(base: Path, folder: Path, *, index: int, layers: int = 2, seed: int = 0) -> Path:
    """One PEFT LoRA over every linear module, rank from ``RANKS``, fp32 factors."""
    from peft import LoraConfig

    folder = Path(folder)
    if (folder / _DONE).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rank = RANKS[index % len(RANKS)]
    hidden, inter = LLAMA_7B_SHAPE["hidden_size"], LLAMA_7B_SHAPE["intermediate_size"]
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}
    generator = torch.Generator().manual_seed(seed * 1000 + index)
    tensors: Dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for module in TARGETS:
            out_features, in_features = dims[module]
            block = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), base_model_name_or_path=str(base)).save_pretrained(str(folder))
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
