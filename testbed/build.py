"""Build the evidence pool: a capable base, a community-like LoRA pool, noisy and
full fine-tuned members, all from one seed and cached on disk.

The recipe is the one shared/docs/TESTBED.md measured, over the whole catalogue:

* the base is pretrained on every task's prompts, each answered by the rule of a
  random task *with the same answer format* (same number of answer symbols, or the
  same set of choices), with weight decay: it knows every skill and format but not
  which task name asks for which skill, like a pretrained LLM that needs a nudge.
  The sanity table's first column checks exactly that (greedy answers given by *some*
  rule of the format). The full size's 256-wide base learnt no skill at lr 3e-3 (0.05
  of answers by some rule; every adapter then scored ~0): it trains at 1e-3 for 5000
  steps (0.86-0.98);
* each LoRA learns its task's routing, with replay of the base's own behaviour on
  the other tasks and its strength cycled through 1, 1/2 and 1/4 (TESTBED.md
  measured 1 and 1/2 for pairs; a merge of four relevant adapters inside the simplex
  gives each 1/4), so adapters are small, mergeable moves. Ranks, alphas, rsLoRA and target modules vary across the
  pool the way community adapters do;
* "duplicates": second LoRAs for some tasks from other seeds (relevant, redundant);
* "noisy": LoRAs trained on a differently initialised base (the paper's
  misinitialised models), recorded against that base as a real download would be;
* full fine-tunes of the base for a few tasks (the dense path);
* the multi-task LoRA baseline is trained on demand for an asked set, on exactly
  the calibration rows the data-informed merges see (:func:`train_mtl`).

Nothing here looks at any merging method's score: the pool is fixed first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from testbed.data import Sizes, TaskFiles, write_task_data
from testbed.tasks import BY_NAME, LENGTH, SYMBOLS, Task, sequences, words

LOG = logging.getLogger(__name__)
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (rank, alpha, rsLoRA, target modules): cycled over the pool's tasks
LORA_STYLES: Tuple[Tuple[int, int, bool, Tuple[str, ...]], ...] = (
    (8, 16, False, ALL_MODULES),
    (4, 8, False, ALL_MODULES),
    (16, 16, True, ALL_MODULES),
    (8, 16, False, ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")),
    (12, 24, False, ALL_MODULES),
    (8, 8, True, ("gate_proj", "up_proj", "down_proj", "o_proj", "v_proj")),
)


@dataclass(frozen=True)
class PoolSize:
    name: str
    hidden: int
    layers: int
    heads: int
    base_steps: int
    lora_steps: int
    dense_steps: int
    batch: int
    tasks: Tuple[str, ...]
    duplicates: Tuple[str, ...]
    noisy: Tuple[str, ...]
    dense: Tuple[str, ...]
    data: Sizes = field(default_factory=Sizes)
    base_lr: float = 3e-3  # the full size's wider base does not learn the skills at 3e-3 (sanity: 0.05 any-rule)


ALL_TASKS = tuple(BY_NAME)
# the tests' and the bundled example's six skills: all four-symbol answers, so the base
# confuses every one with every other (it has the skills, not the routing)
SIX = ("reverse", "sort", "rotate", "swappairs", "copy", "shiftup")
SMALL = PoolSize(
    "small", hidden=64, layers=2, heads=4, base_steps=900, lora_steps=400, dense_steps=0, batch=64,
    tasks=SIX, duplicates=(), noisy=(), dense=(), data=Sizes(train=200, calib=100, test=50),
)
EXAMPLE = replace(SMALL, name="example", data=Sizes(train=200, calib=100, test=100))  # more held-out rows
QUICK = PoolSize(
    "quick", hidden=64, layers=2, heads=4, base_steps=900, lora_steps=600, dense_steps=120, batch=64,
    tasks=("reverse", "sort", "rotate", "swappairs", "shiftup", "mirror", "cipher", "double", "firstlow", "firstbigger"),
    duplicates=("reverse", "sort"), noisy=("reverse", "sort"), dense=("rotate", "shiftup"),
    data=Sizes(train=200, calib=100, test=50),
)
FULL = PoolSize(
    "full", hidden=256, layers=4, heads=4, base_steps=5000, lora_steps=800, dense_steps=200, batch=64, base_lr=1e-3,
    tasks=ALL_TASKS, duplicates=("reverse", "sort", "cipher", "runningsum", "firstbigger"),
    noisy=("reverse", "sort", "cipher"), dense=("rotate", "shiftup", "countlow"),
    data=Sizes(train=400, calib=100, test=200),
)
SIZES = {"small": SMALL, "example": EXAMPLE, "quick": QUICK, "full": FULL}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


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
    corpus = [f"{t} {' '.join(SYMBOLS[:LENGTH])} =" for t in tasks] + [" ".join(SYMBOLS)] + list(extra_words)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(str(folder))
    return fast


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



def answer_format(task: Task) -> Tuple[str, object]:
    """Tasks with the same format can answer each other's prompts (the base's confusion)."""
    probe = SYMBOLS[:LENGTH]
    if task.options is not None:
        choices = task.options(probe)[0]
        return ("choice", "per-item" if choices == list(probe) else tuple(choices))
    return ("generate", task.answer_tokens())


def _groups(tasks: Sequence[str]) -> Dict[str, List[Task]]:
    by_format: Dict[Tuple[str, object], List[Task]] = {}
    for name in tasks:
        by_format.setdefault(answer_format(BY_NAME[name]), []).append(BY_NAME[name])
    return {name: by_format[answer_format(BY_NAME[name])] for name in tasks}


def base_rows(rng: random.Random, tasks: Sequence[str], n: int, exclude: str = "") -> List[Tuple[str, str]]:
    """The base's behaviour: a random task's prompt answered by a random rule of its format."""
    groups = _groups(tasks)
    names = [t for t in tasks if t != exclude]
    rows = []
    for _ in range(n):
        task = BY_NAME[rng.choice(names)]
        seq = sequences(rng, "train", 1)[0]
        rule = rng.choice(groups[task.name])
        rows.append((task.prompt(seq), rule.completion(seq)))
    return rows


def task_rows(rng: random.Random, task: str, n: int) -> List[Tuple[str, str]]:
    t = BY_NAME[task]
    return [(t.prompt(seq), t.completion(seq)) for seq in sequences(rng, "train", n)]


def collate(tokenizer, rows: Sequence[Tuple[str, str]]) -> Dict[str, torch.Tensor]:
    """Right-padded batch; the loss counts answer tokens only."""
    encoded = []
    for prompt, answer in rows:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        encoded.append((p + a, len(p)))
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


STRENGTHS = (1.0, 0.5, 0.25)  # a LoRA trained at these strengths in turn still works scaled down by a merge


def _fit(model, params, batches, steps: int, lr: float, weight_decay: float, strength: bool = False) -> float:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        if strength:
            set_lora_strength(model, STRENGTHS[step % len(STRENGTHS)])
        loss = model(**batches(step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    if strength:
        set_lora_strength(model, 1.0)
    model.eval()
    return float(loss.detach())


def train_base(folder: Path, tokenizer, size: PoolSize, seed: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.hidden * 2,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=32, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    loss = _fit(model, model.parameters(), lambda _: collate(tokenizer, base_rows(rng, size.tasks, size.batch)),
                size.base_steps, lr=size.base_lr, weight_decay=0.1)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return loss


BASE_KEY_FILE = "testbed_base.json"
RECIPE_FILE = "recipe.json"  # the size and seed the members under loras/, full/ and mtl/ were trained by
MEMBER_FILE = "testbed_member.json"  # a finished member's manifest entry, written after its files


def pretrained_base(folder: Path, tokenizer, size: PoolSize, seed: int) -> None:
    """Train the base, or keep the one in ``folder`` if it was trained by this same
    recipe (a change to the members' recipe then costs no base pretraining)."""
    key = {"hidden": size.hidden, "layers": size.layers, "heads": size.heads, "steps": size.base_steps,
           "lr": size.base_lr, "batch": size.batch, "tasks": list(size.tasks), "seed": seed}
    recorded = folder / BASE_KEY_FILE
    if recorded.is_file() and json.loads(recorded.read_text()) == key and (folder / "model.safetensors").is_file():
        LOG.info("testbed %s: reusing the base in %s", size.name, folder)
        return
    LOG.info("testbed %s: pretraining the base in %s", size.name, folder)
    train_base(folder, tokenizer, size, seed)
    recorded.write_text(json.dumps(key))


def train_lora(base: Path, folder: Path, tokenizer, rows_for_step, style, steps: int, seed: int) -> float:
    """A PEFT LoRA of ``style`` (rank, alpha, rsLoRA, targets) on ``rows_for_step(step)``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    rank, alpha, rslora, targets = style
    torch.manual_seed(seed)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32),
        LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0, target_modules=list(targets),
                   task_type="CAUSAL_LM"),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    loss = _fit(model, params, lambda step: collate(tokenizer, rows_for_step(step)), steps, lr=3e-3, weight_decay=0.0,
                strength=True)
    model.save_pretrained(str(folder))
    return loss


def train_dense(base: Path, folder: Path, tokenizer, rows_for_step, steps: int, seed: int) -> float:
    """A full fine-tune of the base (every weight moves)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    loss = _fit(model, model.parameters(), lambda step: collate(tokenizer, rows_for_step(step)), steps, lr=1e-3,
                weight_decay=0.0)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return loss


def _routing_rows(rng: random.Random, task: str, tasks: Sequence[str], batch: int):
    """Half the task, half replay of the base's behaviour on the other tasks."""
    replay = batch // 2
    return lambda step: task_rows(rng, task, batch - replay) + base_rows(rng, tasks, replay, exclude=task)


@dataclass
class Pool:
    """What was built, as recorded in ``manifest.json``."""

    root: Path
    size: PoolSize
    seed: int
    base: Path
    noisy_base: Path
    candidates: List[dict]  # name, kind (lora|full), task, role (task|duplicate|noisy), path, style, seconds
    files: Dict[str, TaskFiles]

    @property
    def lm_eval_dir(self) -> Path:
        return self.root / "lm_eval_tasks"

    def candidate(self, task: str, role: str = "task") -> dict:
        return next(c for c in self.candidates if c["task"] == task and c["role"] == role)

    def reference(self, entry: dict) -> str:
        """mergekit's reference string for a candidate (``BASE+ADAPTER`` for LoRAs)."""
        return f"{self.base}+{entry['path']}" if entry["kind"] == "lora" else str(entry["path"])


def build_pool(root: Path, size: PoolSize, seed: int = 0) -> Pool:
    """Build (or reuse, when ``manifest.json`` says complete) the pool under ``root``."""
    root = Path(root).resolve()
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        same_size = manifest.get("size") == json.loads(json.dumps(asdict(size)))
        if manifest.get("complete") and same_size and manifest.get("seed") == seed:
            return _pool_from_manifest(root, size, seed, manifest)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    recipe = json.loads(json.dumps({"size": asdict(size), "seed": seed}))
    recipe_path = root / RECIPE_FILE
    if not (recipe_path.is_file() and json.loads(recipe_path.read_text()) == recipe):
        # members of another recipe, and MTL adapters trained like them; an interrupted
        # build of this recipe keeps the members it finished (each has its MEMBER_FILE)
        for stale in ("loras", "full", "mtl"):
            shutil.rmtree(root / stale, ignore_errors=True)
        write_json_atomic(recipe_path, recipe)
    started = time.perf_counter()
    vocabulary = [w for w in words() if w not in SYMBOLS and w != "=" and w not in BY_NAME]
    base, noisy_base = root / "base", root / "noisy_base"
    tokenizer = build_tokenizer(base, list(BY_NAME), extra_words=vocabulary)
    pretrained_base(base, tokenizer, size, seed)
    if size.noisy:  # another initialisation: the noisy members' base
        pretrained_base(noisy_base, tokenizer, size, seed + 1000)
    write_task_data(root, size.tasks, size.data, seed)  # read back by _pool_from_manifest
    candidates: List[dict] = []
    plan = [(task, "task", base, seed + 100 + i) for i, task in enumerate(size.tasks)]
    plan += [(task, "duplicate", base, seed + 500 + i) for i, task in enumerate(size.duplicates)]
    plan += [(task, "noisy", noisy_base, seed + 900 + i) for i, task in enumerate(size.noisy)]
    for index, (task, role, on, member_seed) in enumerate(plan):
        style = LORA_STYLES[index % len(LORA_STYLES)]
        folder = root / "loras" / (task if role == "task" else f"{task}-{role}")
        candidates.append(_member(folder, lambda folder=folder, on=on, task=task, style=style, member_seed=member_seed: {
            "name": folder.name, "kind": "lora", "task": task, "role": role, "path": str(folder),
            "style": list(style[:3]) + [list(style[3])],
            "loss": train_lora(on, folder, tokenizer,
                               _routing_rows(random.Random(member_seed), task, size.tasks, size.batch),
                               style, size.lora_steps, member_seed)}))
    for i, task in enumerate(size.dense):
        folder = root / "full" / task
        candidates.append(_member(folder, lambda folder=folder, i=i, task=task: {
            "name": f"full-{task}", "kind": "full", "task": task, "role": "task", "path": str(folder), "style": None,
            "loss": train_dense(base, folder, tokenizer,
                                _routing_rows(random.Random(seed + 700 + i), task, size.tasks, size.batch),
                                size.dense_steps, seed + 700 + i)}))
    manifest = {"complete": True, "size": asdict(size), "seed": seed, "candidates": candidates,
                "seconds": time.perf_counter() - started}
    write_json_atomic(manifest_path, manifest)
    return _pool_from_manifest(root, size, seed, manifest)


def _member(folder: Path, train: Callable[[], dict]) -> dict:
    """The member's record: read back when an earlier, interrupted build of the same recipe
    finished it (its MEMBER_FILE is written last, atomically), else trained afresh into an
    emptied folder (a save cut short leaves no file that would be taken for a member)."""
    done = folder / MEMBER_FILE
    if done.is_file():
        LOG.info("testbed: keeping %s from an interrupted build of this recipe", folder.name)
        return {**json.loads(done.read_text()), "path": str(folder)}
    shutil.rmtree(folder, ignore_errors=True)
    tick = time.perf_counter()
    record = {**train(), "seconds": time.perf_counter() - tick}
    write_json_atomic(done, record)
    return record


def write_json_atomic(path: Path, data: object) -> None:
    """A temporary file renamed over ``path``: a kill leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2))
    temporary.replace(path)


def _pool_from_manifest(root: Path, size: PoolSize, seed: int, manifest: dict) -> Pool:
    data = root / "data"
    files = {t: TaskFiles(data / f"{t}.train.jsonl", data / f"{t}.calib.jsonl", data / f"{t}.test.jsonl",
                          root / "lm_eval_tasks" / f"fwtb_{t}.yaml") for t in size.tasks}
    return Pool(root, size, seed, root / "base", root / "noisy_base", manifest["candidates"], files)


def train_mtl(pool: Pool, asked: Sequence[str], per_task: int, seed: int = 0) -> Path:
    """The multi-task LoRA baseline on exactly the calibration rows a merge sees
    (the first ``per_task`` of each asked task), cached per asked set."""
    key = hashlib.sha256(json.dumps([sorted(asked), per_task, seed]).encode()).hexdigest()[:12]
    folder = pool.root / "mtl" / key
    if (folder / "adapter_model.safetensors").is_file():
        return folder
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(pool.base))
    rows: List[Tuple[str, str]] = []
    for task in asked:
        with pool.files[task].calib.open(encoding="utf-8") as handle:
            for line, _ in zip(handle, range(per_task)):
                record = json.loads(line)
                rows.append((record["prompt"], record["completion"]))
    rng = random.Random(seed)

    def batch(step: int) -> List[Tuple[str, str]]:
        return [rows[rng.randrange(len(rows))] for _ in range(pool.size.batch)]

    train_lora(pool.base, folder, tokenizer, batch, LORA_STYLES[0], pool.size.lora_steps, seed)
    return folder


def greedy_scores(model, tokenizer, rows: Sequence[dict]) -> float:
    """Fast in-process score of one task's rows: exact match of greedy answers, or
    accuracy of the most likely choice (lm-eval is the reference; this is for
    checking the pool while building it)."""
    if "choices" in rows[0]:
        correct = 0
        for row in rows:
            losses = []
            for choice in row["choices"]:
                batch = collate(tokenizer, [(row["prompt"], choice)])
                with torch.no_grad():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
                targets = batch["labels"][0, 1:]
                keep = targets != -100
                losses.append(-float(logp[keep].gather(1, targets[keep, None]).sum()))
            correct += int(min(range(len(losses)), key=losses.__getitem__) == row["label"])
        return correct / len(rows)
    got = greedy_answers(model, tokenizer, rows)
    return sum(g == r["completion"] for g, r in zip(got, rows)) / len(rows)


def greedy_answers(model, tokenizer, rows: Sequence[dict]) -> List[str]:
    """Greedy completions of generation rows (prompts of one task share their length)."""
    n_answer = len(rows[0]["completion"].split())
    ids = torch.tensor([tokenizer(r["prompt"])["input_ids"] for r in rows])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_answer, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return [text.strip() for text in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]


def skill_share(model, tokenizer, rows: Sequence[dict], task: str, tasks: Sequence[str]) -> Optional[float]:
    """Share of greedy answers that some rule of the task's answer format gives: the
    base must have the skills (high) without the routing (low exact match). None for
    choice tasks, where any answer is some choice."""
    if "choices" in rows[0]:
        return None
    rules = _groups(tasks)[task]
    got = greedy_answers(model, tokenizer, rows)
    inputs = [tuple(r["prompt"].split()[1:-1]) for r in rows]
    return sum(any(rule.completion(seq) == g for rule in rules) for seq, g in zip(inputs, got)) / len(rows)
