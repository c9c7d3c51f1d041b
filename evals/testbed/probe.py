"""Recipe probe, for choosing the pool's LoRA training length from the sanity check
alone: train the asked tasks' LoRAs (their pool styles and seeds) for N steps on an
already built base and print how much of their gain a relevant-only merge keeps.

    python -m evals.testbed.probe --root POOL --steps 400 800 --asked reverse sort cipher firstbigger
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
from pathlib import Path

import torch

from evals.common import THREADS
from testbed.build import (
    LORA_STYLES,
    SIZES,
    _pool_from_manifest,
    _routing_rows,
    greedy_scores,
    read_rows,
    train_lora,
)
from testbed.sanity import LAMBDAS, merged_model


def main() -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--steps", type=int, nargs="+", required=True)
    parser.add_argument("--asked", nargs="+", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(THREADS)
    manifest = json.loads((args.root / "manifest.json").read_text())
    pool = _pool_from_manifest(args.root, SIZES[manifest["size"]["name"]], manifest["seed"], manifest)
    tokenizer = AutoTokenizer.from_pretrained(str(pool.base))
    rows = {t: read_rows(pool.files[t].test) for t in args.asked}
    calib = {t: read_rows(pool.files[t].calib, 50) for t in args.asked}
    for steps in args.steps:
        with tempfile.TemporaryDirectory() as folder:
            entries = []
            for task in args.asked:
                i = pool.size.tasks.index(task)
                seed = pool.seed + 100 + i
                out = Path(folder) / task
                train_lora(pool.base, out, tokenizer, _routing_rows(random.Random(seed), task, pool.size.tasks, pool.size.batch),
                           LORA_STYLES[i % len(LORA_STYLES)], steps, seed)
                entries.append({"name": task, "kind": "lora", "path": str(out)})
            own = {e["name"]: greedy_scores(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(pool.base)),
                                                                      e["path"]).eval(), tokenizer, rows[e["name"]]) for e in entries}
            hull = merged_model(pool, entries, [1 / len(entries)] * len(entries))
            best = max(LAMBDAS, key=lambda lam: sum(greedy_scores(merged_model(pool, entries, [lam] * len(entries)), tokenizer,
                                                                   calib[t]) for t in args.asked))
            tuned = merged_model(pool, entries, [best] * len(entries))
            mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
            hull_s = {t: greedy_scores(hull, tokenizer, rows[t]) for t in args.asked}
            tuned_s = {t: greedy_scores(tuned, tokenizer, rows[t]) for t in args.asked}
            print(f"steps {steps}: individual {own} mean {mean(own):.2f}; relevant 1/k {hull_s} mean {mean(hull_s):.2f}; "
                  f"lambda {best} {tuned_s} mean {mean(tuned_s):.2f}", flush=True)


if __name__ == "__main__":
    main()
