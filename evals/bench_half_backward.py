"""Seconds for one Llama-2-7B linear layer's forward and backward to its input,
in float32, in bfloat16 as torch computes it, and in bfloat16 with the oracle's
float32 backward products (``mergekit_fw/oracle/half_backward.py``).

    python -m evals.bench_half_backward [--tokens 128] [--repeats 3]

On a CPU without native bf16 products the plain bf16 backward is the reference
gemm; this prints by how much the oracle's routing saves there. (On a CPU with
native products the oracle routes nothing, and the third column is the same native
products through the routed function.)
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List

import torch
from torch import nn

from evals.common import THREADS, machine, median, write_results
from mergekit_fw.oracle import half_backward

SHAPES = {"q_proj (4096 -> 4096)": (4096, 4096), "up_proj (4096 -> 11008)": (4096, 11008),
          "down_proj (11008 -> 4096)": (11008, 4096), "lm_head (4096 -> 32000)": (4096, 32000)}


def _seconds(run: Callable[[], None], repeats: int) -> List[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def _step(layer: nn.Linear, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        layer(x).float().square().mean().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="rows of the input (batch x sequence)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    slow = half_backward.slow_half_products(torch.bfloat16, torch.device("cpu"))
    rows: Dict[str, Dict[str, float]] = {}
    for name, (n_in, n_out) in SHAPES.items():
        torch.manual_seed(0)
        row = {}
        for label, dtype, routed in (("float32", torch.float32, False), ("bfloat16, torch", torch.bfloat16, False),
                                     ("bfloat16, float32 backward", torch.bfloat16, True)):
            layer = nn.Linear(n_in, n_out, bias=False).to(dtype).requires_grad_(False)
            if routed:  # what the oracle does on a slow CPU, forced here on any CPU
                layer.forward = lambda x, layer=layer: half_backward._Linear.apply(x, layer.weight, None)
            x = torch.randn(args.tokens, n_in, dtype=dtype, requires_grad=True)
            row[label] = median(_seconds(_step(layer, x), args.repeats))
        rows[name] = row
        print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    labels = list(next(iter(rows.values())))
    lines = [
        "# A linear layer's forward and backward (to its input), Llama-2-7B shapes",
        "",
        f"`python -m evals.bench_half_backward --tokens {args.tokens} --repeats {args.repeats}`; median of "
        f"{args.repeats}, seconds. This CPU has native bf16 products: {'no' if slow else 'yes'} "
        f"(the oracle routes its backward through float32: {'yes' if slow else 'no'}).",
        "",
        f"Machine: {machine()}",
        "",
        "| layer | " + " | ".join(labels) + " | torch bf16 / routed |",
        "| --- | " + " | ".join("---:" for _ in labels) + " | ---: |",
    ]
    for name, row in rows.items():
        ratio = row["bfloat16, torch"] / row["bfloat16, float32 backward"]
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in labels) + f" | {ratio:.1f}x |")
    write_results("bench_half_backward", {"machine": machine(), "tokens": args.tokens, "repeats": args.repeats,
                                          "native_bf16": not slow, "seconds": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
