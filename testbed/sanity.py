"""Does the pool measure anything? The check TESTBED.md asks for before any method
is compared: merging *only the relevant* adapters must keep most of what each one
gains alone. If even that fails, every method looks broken and nothing is measured.

For an asked set of tasks: the base's score, each task's own adapter's score (the
individual upper bound), and the relevant adapters merged inside the convex hull
(1/k each, the region Frank-Wolfe searches), by plain addition (1 each), and by
task arithmetic with one scaling picked on the calibration rows. Scores
here are the fast in-process ones (:func:`testbed.build.greedy_scores`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from testbed.build import Pool, greedy_scores, skill_share
from testbed.data import read_rows

LAMBDAS = (0.25, 0.4, 0.55, 0.7, 0.85, 1.0)


def merged_model(pool: Pool, entries: Sequence[dict], weights: Sequence[float]):
    """base + sum_i w_i delta_i, written by mergekit-fw's own writer and loaded back."""
    from transformers import LlamaForCausalLM

    from mergekit_fw.pool.pool import open_pool

    opened = open_pool(pool_spec(pool, entries))
    coefficients = torch.tensor(list(weights), dtype=torch.float64)[:, None].expand(len(entries), len(opened.tensor_names()))
    with tempfile.TemporaryDirectory() as folder:
        write_coefficients(opened, coefficients, Path(folder) / "merged", str(pool.base))
        return LlamaForCausalLM.from_pretrained(str(Path(folder) / "merged"), dtype=torch.float32).eval()


def pool_spec(pool: Pool, entries: Sequence[dict]):
    """mergekit-fw's pool spec of these members (LoRAs on the pool's base)."""
    from mergekit_fw.pool.references import CandidateSpec, ModelSource, PoolSpec

    base = ModelSource(str(pool.base))
    return PoolSpec(base, tuple(
        CandidateSpec(e["name"], base, ModelSource(e["path"])) if e["kind"] == "lora" else CandidateSpec(e["name"], ModelSource(e["path"]))
        for e in entries))


def write_coefficients(opened, coefficients: torch.Tensor, out: Path, base_model: str) -> None:
    """base + sum_i c[i, l] delta_i[l] to ``out`` by mergekit-fw's writer; ``c`` need not
    lie on the simplex (plain addition at 1 each puts the base's weight below zero)."""
    from mergekit_fw.output.writer import write_merged_model
    from mergekit_fw.solve.table import CoefficientTable

    table = CoefficientTable.at_base(opened.names, opened.tensor_names(), "evals", base_model)
    table.weights[1:] = coefficients
    table.weights[0] = 1.0 - coefficients.sum(dim=0)
    write_merged_model(opened, table, out, progress=False)


def sanity_table(pool: Pool, asked: Sequence[str]) -> List[Dict[str, object]]:
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(pool.base))
    base = LlamaForCausalLM.from_pretrained(str(pool.base)).eval()
    entries = [pool.candidate(task) for task in asked]
    rows = {task: read_rows(pool.files[task].test) for task in asked}
    hull = merged_model(pool, entries, [1.0 / len(entries)] * len(entries))
    added = merged_model(pool, entries, [1.0] * len(entries))
    # task arithmetic over the relevant adapters with its one scaling picked on calibration rows
    calib = {task: read_rows(pool.files[task].calib, 50) for task in asked}
    best, picked = -1.0, None
    for weight in LAMBDAS:
        model = merged_model(pool, entries, [weight] * len(entries))
        score = sum(greedy_scores(model, tokenizer, calib[task]) for task in asked) / len(asked)
        if score > best:
            best, picked = score, (weight, model)
    lam, tuned = picked
    out = []
    for task, entry in zip(asked, entries):
        own = (PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(pool.base)), entry["path"])
               if entry["kind"] == "lora" else LlamaForCausalLM.from_pretrained(entry["path"])).eval()
        scores = {name: greedy_scores(model, tokenizer, rows[task]) for name, model in
                  (("base", base), ("individual", own), ("relevant, 1/k each", hull), ("relevant, 1 each", added),
                   (f"relevant, lambda {lam:g} (picked on calibration)", tuned))}
        skill = skill_share(base, tokenizer, rows[task], task, pool.size.tasks)
        out.append({"task": task, "base: some rule of the format": skill, **scores})
    return out


def markdown(table: List[Dict[str, object]], title: str) -> str:
    columns = [k for k in table[0] if k != "task"]
    lines = [f"# {title}", "", "| task | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for row in table:
        lines.append(f"| {row['task']} | " + " | ".join("-" if row[c] is None else f"{row[c]:.2f}" for c in columns) + " |")
    means = []
    for c in columns:
        known = [float(r[c]) for r in table if r[c] is not None]
        means.append(f"**{sum(known) / len(known):.2f}**" if known else "-")
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"
