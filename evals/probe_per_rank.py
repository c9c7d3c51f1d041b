"""Probe for issue 17's miss at many asked tasks: is the layer-wise parametrisation the limit?

Every data-informed row of experiment 3 (FW, projected gradient, the supervised baseline)
learns one coefficient per adapter and tensor, ``W = W0 + sum_i c[i, l] s_i B_i A_i``, and
at 20 asked tasks they all end within 1.5 points of each other: the optimiser is not what
holds them back. This probe learns the same thing with one coefficient per rank component,
``W = W0 + sum_i sum_j c[i, l, j] s_i B_i[:, j] A_i[j, :]`` (still a low-rank merge), by the
supervised baseline's own recipe (Adam, lr 1e-2, coefficients from 0.3 kept in [0, 1], one
batch of 16 rows per task per step), and compares the cross-entropy on the calibration rows
and on the tasks' held-out test rows. A probe, not a method: nothing here reaches the package.

    python -m evals.probe_per_rank --pool W/quick_2/pool --steps 500
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from evals.common import write_results
from mergekit_fw.calibration.batches import CalibrationSet, build_calibration
from mergekit_fw.objective import batch_loss, position_weights
from mergekit_fw.pool.pool import open_pool
from testbed.build import SIZES, Pool, _pool_from_manifest
from testbed.sanity import pool_spec

LOG = logging.getLogger(__name__)


class GatedPool(nn.Module):
    """The adapters of every module side by side, one gate per rank component; ``shared``
    ties the gates of one adapter's components together (the layer-wise parametrisation)."""

    def __init__(self, model: nn.Module, opened, shared: bool, init: float = 0.3):
        super().__init__()
        modules = dict(model.named_modules())
        self.gates = nn.ParameterList()
        self.paths: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._handles = []
        for tensor in opened.tensor_names():
            here = [c.factors[tensor] for c in opened.candidates if tensor in getattr(c, "factors", {})]
            if not here:
                continue
            A = torch.cat([f.A.float() for f in here])
            B = torch.cat([f.B.float() for f in here], dim=1)
            scale = torch.cat([torch.full((f.rank,), float(f.scale)) for f in here])
            owner = torch.cat([torch.full((f.rank,), k, dtype=torch.long) for k, f in enumerate(here)])
            gate = nn.Parameter(torch.full((len(here),) if shared else (len(owner),), init))
            self.gates.append(gate)
            expand = owner if shared else torch.arange(len(owner))
            module = modules[tensor.removesuffix(".weight")]
            self._handles.append(module.register_forward_hook(self._hook(A, B, scale, gate, expand)))
            self.paths.append((tensor, A, B, scale, expand))

    @staticmethod
    def _hook(A, B, scale, gate, expand):
        def add(module, inputs, output):
            return output + ((inputs[0] @ A.T) * (gate[expand] * scale)) @ B.T

        return add

    def clamp(self) -> None:
        with torch.no_grad():
            for gate in self.gates:
                gate.clamp_(0.0, 1.0)

    def merged_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The merged weights, ``W0 + B diag(c * s) A`` per module: what a writer would store."""
        state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        with torch.no_grad():
            for (tensor, A, B, scale, expand), gate in zip(self.paths, self.gates):
                state[tensor] += (B * (gate[expand] * scale)) @ A
        return state

    def count(self) -> int:
        return sum(g.numel() for g in self.gates)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def mean_loss(model: nn.Module, calibration: CalibrationSet) -> float:
    weights = position_weights(calibration)
    with torch.no_grad():
        return float(
            sum(
                batch_loss(
                    model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits,
                    b,
                    weights,
                    "cross_entropy",
                )
                for b in calibration.batches
            )
        )


def exact_match(state: dict, model: nn.Module, tokenizer, pool: Pool, tasks: list[str], folder: Path) -> dict:
    """lm-eval on the tasks' test rows for the merged weights, normalised by each task's
    own adapter (the experiment's cached individual scores, beside the pool)."""
    from evals.scoring import individual_scores, normalized, test_scores

    model.save_pretrained(str(folder), state_dict=state)
    tokenizer.save_pretrained(str(folder))
    scores = test_scores(folder, pool, tasks)
    individual = individual_scores(pool, tasks, pool.root.parent / "individual")
    return {"normalized": normalized(scores, individual), "scores": scores}


def learn(
    model, opened, calibration: CalibrationSet, held_out: CalibrationSet, *, shared: bool, steps: int, lr: float, score
) -> dict:
    started = time.perf_counter()
    gated = GatedPool(model, opened, shared)
    optimizer = torch.optim.Adam(gated.gates.parameters(), lr=lr)
    weights = position_weights(calibration)
    by_task: dict[int, list] = {}
    for batch in calibration.batches:
        by_task.setdefault(batch.task, []).append(batch)
    try:
        for step in range(steps):
            optimizer.zero_grad()
            for task, batches in by_task.items():  # one batch a task a step, cycling
                batch = batches[step % len(batches)]
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
                (batch_loss(logits, batch, weights, "cross_entropy") * len(batches)).backward()
            optimizer.step()
            gated.clamp()
        result = {
            "parametrisation": "layer-wise" if shared else "per rank component",
            "coefficients": gated.count(),
            "calibration_loss": mean_loss(model, calibration),
            "held_out_loss": mean_loss(model, held_out),
            "seconds": round(time.perf_counter() - started, 1),
        }
        result.update(score(gated.merged_state(model)))
    finally:
        gated.remove()
    LOG.info("%s", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pool", type=Path, required=True, help="a testbed's pool folder (its manifest.json, base, loras, data)"
    )
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--name", default="probe_per_rank")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from transformers import AutoTokenizer, LlamaForCausalLM

    manifest = json.loads((args.pool / "manifest.json").read_text())
    pool = _pool_from_manifest(args.pool.resolve(), SIZES[manifest["size"]["name"]], manifest["seed"], manifest)
    tasks = sorted(pool.size.tasks)
    opened = open_pool(pool_spec(pool, [pool.candidate(t) for t in tasks]))
    tokenizer = AutoTokenizer.from_pretrained(str(pool.base))
    model = LlamaForCausalLM.from_pretrained(str(pool.base), dtype=torch.float32)
    model.requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        sets: dict[str, CalibrationSet] = {}
        for split, per_task in (("calib", 100), ("test", 50)):
            rows = Path(tmp) / f"{split}.jsonl"
            rows.write_text("".join(getattr(pool.files[t], split).read_text() for t in tasks))
            sets[split] = build_calibration(
                rows, tokenizer, samples_per_task=per_task, batch_size=16, max_length=64, objective="cross_entropy"
            )
        folders = (Path(tmp) / f"merged_{k}" for k in itertools.count())

        def score(state: dict) -> dict:
            return exact_match(state, model, tokenizer, pool, tasks, next(folders))

        results = {
            "pool": str(args.pool),
            "tasks": tasks,
            "steps": args.steps,
            "lr": args.lr,
            "base": {
                "calibration_loss": mean_loss(model, sets["calib"]),
                "held_out_loss": mean_loss(model, sets["test"]),
            },
            "runs": [
                learn(
                    model, opened, sets["calib"], sets["test"], shared=shared, steps=args.steps, lr=args.lr, score=score
                )
                for shared in (True, False)
            ],
        }
    write_results(args.name, results, markdown(results, args))


def markdown(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"# Probe: per-rank-component coefficients against layer-wise ones ({args.pool})",
        "",
        f"`python -m evals.probe_per_rank --pool {args.pool} --steps {args.steps} --name {args.name}`: "
        f"{len(results['tasks'])} LoRAs, all their tasks asked, Adam (lr {args.lr}, {args.steps} steps of one "
        "batch of 16 rows per task, from 0.3, kept in [0, 1]) on the calibration rows; held-out: the tasks' "
        "test rows (cross-entropy on the answer, and lm-eval's score normalised by each task's own adapter).",
        "",
        "| parametrisation | coefficients | calibration loss | held-out loss | normalised | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| base | 0 | {results['base']['calibration_loss']:.4f} | {results['base']['held_out_loss']:.4f} | | |",
    ]
    lines += [
        f"| {r['parametrisation']} | {r['coefficients']} | {r['calibration_loss']:.4f} | {r['held_out_loss']:.4f} "
        f"| {r['normalized']:.1f} | {r['seconds']} |"
        for r in results["runs"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
