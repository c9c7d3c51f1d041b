"""Synthetic LoRA pools that behave like community LoRAs on a capable base.

Used by the bundled example, the tests and the benchmarks. Everything is built
locally and deterministically from a seed: a word-level tokenizer trained with
``tokenizers``, a small ``LlamaForCausalLM`` base, PEFT LoRA adapters, calibration
and held-out JSONL files, lm-eval task YAMLs and the merge configs.

The recipe follows measured lessons (shared/docs/TESTBED.md): the base is
pretrained on *all* skills with the answer drawn from a random skill whatever the
task name says (so it has the skills, not the routing, like a real pretrained
LLM), with weight decay; each LoRA learns only to route its task name to its
skill, with replay of the base's behaviour on the other tasks and alternating
full/half adapter strength, so that adapters stay small, compatible moves. Every
prompt is a task name and four distinct symbols; every answer is four symbols.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

LOG = logging.getLogger(__name__)

SYMBOLS = [chr(ord("a") + i) for i in range(16)]
LENGTH = 4
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _reverse(x):
    return list(reversed(x))


def _sort(x):
    return sorted(x, key=SYMBOLS.index)


def _rotate(x):
    return list(x[1:]) + [x[0]]


def _swap(x):
    return [x[1], x[0], x[3], x[2]]


def _copy(x):
    return list(x)


def _shift(x):
    return [SYMBOLS[(SYMBOLS.index(s) + 1) % len(SYMBOLS)] for s in x]


SKILLS: Dict[str, Callable[[Sequence[str]], List[str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "rotate": _rotate,
    "swap": _swap,
    "copy": _copy,
    "shift": _shift,
}
ASKED = ("reverse", "sort")
IRRELEVANT = ("rotate", "swap", "copy", "shift")


@dataclass(frozen=True)
class TestbedSize:
    """How much to build and train; ``small`` is the test suite's, ``example`` the README's."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    base_steps: int = 1500
    lora_steps: int = 300
    batch: int = 64
    lora_rank: int = 8
    calib_per_task: int = 100
    eval_per_task: int = 100
    tasks: Tuple[str, ...] = tuple(SKILLS)


SIZES = {
    "example": TestbedSize(),
    "small": TestbedSize(base_steps=900, lora_steps=200, eval_per_task=50),
}


def _split(seq: Tuple[str, ...]) -> str:
    """Deterministic disjoint split of all symbol sequences: eval / calib / train."""
    h = sum((i + 7) * (SYMBOLS.index(s) + 3) for i, s in enumerate(seq)) % 10
    return "eval" if h == 0 else "calib" if h == 1 else "train"


def _sequences(rng: random.Random, split: str, n: int) -> List[Tuple[str, ...]]:
    out = []
    while len(out) < n:
        seq = tuple(rng.sample(SYMBOLS, LENGTH))
        if _split(seq) == split:
            out.append(seq)
    return out


def prompt_text(task: str, seq: Sequence[str]) -> str:
    return f"{task} {' '.join(seq)} ="


def answer_text(task: str, seq: Sequence[str]) -> str:
    return " ".join(SKILLS[task](seq))


def build_tokenizer(folder: Path, tasks: Sequence[str], extra_words: Sequence[str] = ()):
    """A word-level tokenizer trained with ``tokenizers``, saved as a HF fast tokenizer
    (task names, symbols, ``=`` and any ``extra_words``)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS)
    corpus = [prompt_text(t, SYMBOLS[:LENGTH]) for t in tasks] + [" ".join(SYMBOLS)] + list(extra_words)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(str(folder))
    return fast


def _encode(tokenizer, task_prompt: str, answer: str) -> Tuple[List[int], int]:
    p = tokenizer(task_prompt)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return p + a, len(p)


def _batch(tokenizer, rows: List[Tuple[str, str]]) -> Tuple[torch.Tensor, torch.Tensor]:
    encoded = [_encode(tokenizer, p, a) for p, a in rows]
    ids = torch.tensor([e for e, _ in encoded])
    labels = ids.clone()
    for i, (_, n_prompt) in enumerate(encoded):
        labels[i, :n_prompt] = -100
    return ids, labels


def _pretrain_rows(rng: random.Random, tasks: Sequence[str], n: int, exclude: str = "") -> List[Tuple[str, str]]:
    """Prompts of random task names answered by a random skill: skills without routing."""
    names = [t for t in tasks if t != exclude]
    rows = []
    for seq in _sequences(rng, "train", n):
        task = rng.choice(names)
        rows.append((prompt_text(task, seq), answer_text(rng.choice(list(tasks)), seq)))
    return rows


def _task_rows(rng: random.Random, task: str, n: int) -> List[Tuple[str, str]]:
    return [(prompt_text(task, seq), answer_text(task, seq)) for seq in _sequences(rng, "train", n)]


def train_base(folder: Path, tokenizer, size: TestbedSize, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.hidden * 2,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=size.base_steps, pct_start=0.1)
    model.train()
    for step in range(size.base_steps):
        ids, labels = _batch(tokenizer, _pretrain_rows(rng, size.tasks, size.batch))
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 300 == 0:
            LOG.info("base step %d loss %.3f", step, float(loss))
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return model


def set_lora_strength(model, factor: float) -> None:
    """Scale every LoRA layer to ``factor`` of its trained strength (alternating full
    and half strength in training keeps an adapter useful when a merge scales it down).
    The full scaling is remembered on first use, so rsLoRA's alpha/sqrt(r) is kept too."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            full = getattr(module, "_full_scaling", None)
            if full is None:
                full = module._full_scaling = dict(module.scaling)
            for name in module.scaling:
                module.scaling[name] = full[name] * factor


def train_lora(base_folder: Path, folder: Path, tokenizer, task: str, size: TestbedSize, seed: int) -> None:
    """A LoRA that routes ``task`` to its skill and leaves the other tasks to the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = LlamaForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    config = LoraConfig(
        r=size.lora_rank,
        lora_alpha=2 * size.lora_rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    model.train()
    replay = size.batch // 2
    for step in range(size.lora_steps):
        set_lora_strength(model, 1.0 if step % 2 == 0 else 0.5)
        rows = _task_rows(rng, task, size.batch - replay) + _pretrain_rows(rng, size.tasks, replay, exclude=task)
        ids, labels = _batch(tokenizer, rows)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    set_lora_strength(model, 1.0)
    model.save_pretrained(str(folder), safe_serialization=True)


def write_jsonl(path: Path, rows: List[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


LM_EVAL_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
target_delimiter: " "
generation_kwargs:
  until: []
  max_gen_toks: {tokens}
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "^\\\\s*(.*?)\\\\s*$"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@dataclass
class Testbed:
    root: Path
    base: Path
    adapters: Dict[str, Path]
    calibration: Path
    eval_files: Dict[str, Path]
    lm_eval_dir: Path
    asked: Tuple[str, ...]
    irrelevant: Tuple[str, ...]
    extra: Dict[str, Path] = field(default_factory=dict)

    def reference(self, task: str) -> str:
        return f"{self.base}+{self.adapters[task]}"

    def lm_eval_task(self, task: str) -> str:
        return f"fw_tiny_{task}"


def write_data(root: Path, size: TestbedSize, seed: int, asked: Sequence[str]) -> Tuple[Path, Dict[str, Path], Path]:
    rng = random.Random(seed + 1)
    calibration = root / "calib.jsonl"
    write_jsonl(
        calibration,
        [
            {"task": task, "prompt": prompt_text(task, seq), "completion": answer_text(task, seq)}
            for task in asked
            for seq in _sequences(rng, "calib", size.calib_per_task)
        ],
    )
    eval_dir = root / "eval"
    eval_dir.mkdir(exist_ok=True)
    lm_eval_dir = root / "lm_eval_tasks"
    lm_eval_dir.mkdir(exist_ok=True)
    eval_files = {}
    for task in size.tasks:
        path = eval_dir / f"{task}.jsonl"
        write_jsonl(
            path,
            [
                {"task": task, "prompt": prompt_text(task, seq), "completion": answer_text(task, seq)}
                for seq in _sequences(rng, "eval", size.eval_per_task)
            ],
        )
        eval_files[task] = path
        (lm_eval_dir / f"fw_tiny_{task}.yaml").write_text(
            LM_EVAL_TASK.format(name=f"fw_tiny_{task}", data=json.dumps(str(path.resolve())), tokens=LENGTH)
        )
    return calibration, eval_files, lm_eval_dir


def build_testbed(root: Path, *, size: str | TestbedSize = "example", seed: int = 0, asked: Sequence[str] = ASKED) -> Testbed:
    """Build the whole pool into ``root`` (deterministic for a given seed and size)."""
    size = SIZES[size] if isinstance(size, str) else size
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    base.mkdir(exist_ok=True)
    tokenizer = build_tokenizer(base, size.tasks)
    train_base(base, tokenizer, size, seed)
    adapters = {}
    for index, task in enumerate(size.tasks):
        folder = root / "adapters" / task
        folder.mkdir(parents=True, exist_ok=True)
        train_lora(base, folder, tokenizer, task, size, seed + 100 + index)
        adapters[task] = folder
    calibration, eval_files, lm_eval_dir = write_data(root, size, seed, asked)
    testbed = Testbed(
        root=root,
        base=base,
        adapters=adapters,
        calibration=calibration,
        eval_files=eval_files,
        lm_eval_dir=lm_eval_dir,
        asked=tuple(asked),
        irrelevant=tuple(t for t in size.tasks if t not in asked),
    )
    write_configs(testbed)
    return testbed


def write_configs(testbed: Testbed, *, iterations: int = 10, ta_weight: float = 0.3) -> None:
    """fw.yml (Frank-Wolfe) and ta.yml (task arithmetic) over the same pool."""
    import yaml

    models = [{"model": testbed.reference(t)} for t in (*testbed.asked, *testbed.irrelevant)]
    fw = {
        "merge_method": "frank_wolfe",
        "base_model": str(testbed.base),
        "models": models,
        "parameters": {
            "calibration": str(testbed.calibration),
            "samples_per_task": 100,
            "variant": "hard",
            "lmo": "layer",
            "iterations": iterations,
        },
        "dtype": "float32",
    }
    ta = {
        "merge_method": "task_arithmetic",
        "base_model": str(testbed.base),
        "models": [{**m, "parameters": {"weight": ta_weight}} for m in models],
        "dtype": "float32",
    }
    (testbed.root / "fw.yml").write_text(yaml.safe_dump(fw, sort_keys=False))
    (testbed.root / "ta.yml").write_text(yaml.safe_dump(ta, sort_keys=False))


def exact_match(model, tokenizer, rows: List[dict]) -> float:
    """Greedy exact match on held-out rows (a fast in-process check; lm-eval is the
    reference harness)."""
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=LENGTH, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    got = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return sum(g.strip() == r["completion"] for g, r in zip(got, rows)) / len(rows)


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
