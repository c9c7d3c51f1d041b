"""Session fixtures: tiny models, LoRA pools and data, built locally once per session."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
THREADS = 2
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["MERGEKIT_FW_CACHE"] = str(tmp_path_factory.mktemp("fw_cache"))


def subprocess_env(**extra: str) -> dict:
    """Child processes use the same thread budget (two 2-thread processes thrash 2 cores)."""
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1", **extra}


@pytest.fixture(scope="session")
def testbed(tmp_path_factory):
    """The small trained pool: 2 asked tasks, 4 irrelevant LoRAs (~25 s)."""
    from testbed.asked import build_testbed

    return build_testbed(tmp_path_factory.mktemp("testbed"), size="small", seed=0)


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory):
    """A miniature evidence pool (every kind of member, seconds to build)."""
    from testbed.build import PoolSize, build_pool
    from testbed.data import Sizes

    tiny = PoolSize("tiny", hidden=32, layers=1, heads=2, base_steps=60, lora_steps=30, dense_steps=20, batch=16,
                    tasks=("reverse", "sort", "firstlow"), duplicates=("reverse",), noisy=("sort",), dense=("reverse",),
                    data=Sizes(train=20, calib=8, test=6))
    return build_pool(tmp_path_factory.mktemp("tb") / "pool", tiny, seed=0)


@pytest.fixture(scope="session")
def random_pool(tmp_path_factory):
    """An untrained tiny Llama with random LoRAs (nonzero B) and two full fine-tunes.

    Random weights are fine for checking maths (scores against brute force), and
    building them takes well under a second.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from testbed.build import SIX as SKILLS, build_tokenizer

    root = tmp_path_factory.mktemp("random_pool")
    base_dir = root / "base"
    tokenizer = build_tokenizer(base_dir, list(SKILLS))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config)
    base.save_pretrained(str(base_dir))
    adapters = []
    for index, (targets, rank, rslora) in enumerate(
        [(["q_proj", "v_proj"], 4, False), (["q_proj", "down_proj", "o_proj"], 2, True), (["up_proj", "v_proj"], 3, False)]
    ):
        torch.manual_seed(10 + index)
        model = get_peft_model(
            LlamaForCausalLM.from_pretrained(str(base_dir)),
            LoraConfig(r=rank, lora_alpha=2 * rank + index, target_modules=targets, use_rslora=rslora, init_lora_weights=False),
        )
        folder = root / f"lora{index}"
        model.save_pretrained(str(folder))
        adapters.append(folder)
    # An adapter that also retrains lm_head (PEFT modules_to_save: a full tensor in the file)
    torch.manual_seed(30)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(str(base_dir)),
        LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
    )
    with torch.no_grad():
        head = model.base_model.model.lm_head.modules_to_save["default"].weight
        head.add_(0.05 * torch.randn_like(head))
    saved_adapter = root / "lora_saved"
    model.save_pretrained(str(saved_adapter))
    dense = []
    for index in range(2):
        torch.manual_seed(20 + index)
        model = LlamaForCausalLM.from_pretrained(str(base_dir))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        folder = root / f"dense{index}"
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        dense.append(folder)
    calibration = root / "calib.jsonl"
    with calibration.open("w") as handle:
        for task, n in (("reverse", 6), ("sort", 5)):
            for i in range(n):
                handle.write(json.dumps({"task": task, "prompt": f"{task} a b c d", "completion": "= d c b a"[: 3 + 2 * (i % 3)]}) + "\n")
    return {"root": root, "base": base_dir, "adapters": adapters, "saved_adapter": saved_adapter, "dense": dense,
            "calibration": calibration}
