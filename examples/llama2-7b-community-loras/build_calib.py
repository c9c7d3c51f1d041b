"""Build calib.jsonl for the Llama-2 pool: 100 samples each from CNN/DailyMail,
CodeAlpaca-20k and PubMedQA, the paper's three generative tasks.

    python build_calib.py [--out calib.jsonl] [--per-task 100] [--seed 0]

Needs network access to the Hugging Face hub (datasets); not run in CI.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from datasets import load_dataset


def cnn_dailymail(n: int, seed: int):
    data = load_dataset("abisee/cnn_dailymail", "3.0.0", split="train").shuffle(seed=seed).select(range(n))
    for row in data:
        yield {"task": "cnn_dailymail", "prompt": f"Summarize the following article.\n\n{row['article']}\n\nSummary:", "completion": " " + row["highlights"]}


def code_alpaca(n: int, seed: int):
    data = load_dataset("sahil2801/CodeAlpaca-20k", split="train").shuffle(seed=seed).select(range(n))
    for row in data:
        context = f"\n\nInput:\n{row['input']}" if row["input"] else ""
        yield {"task": "code_alpaca", "prompt": f"Instruction:\n{row['instruction']}{context}\n\nResponse:\n", "completion": row["output"]}


def pubmedqa(n: int, seed: int):
    data = load_dataset("qiaojin/PubMedQA", "pqa_labeled", split="train").shuffle(seed=seed).select(range(n))
    for row in data:
        context = " ".join(row["context"]["contexts"])
        yield {"task": "pubmedqa", "prompt": f"Context: {context}\nQuestion: {row['question']}\nAnswer (yes, no or maybe):", "completion": " " + row["final_decision"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("calib.jsonl"))
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    random.seed(args.seed)
    with args.out.open("w", encoding="utf-8") as handle:
        for source in (cnn_dailymail, code_alpaca, pubmedqa):
            for row in source(args.per_task, args.seed):
                handle.write(json.dumps(row) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
