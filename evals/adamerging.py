"""AdaMerging (Yang et al. 2023), layer-wise, on mergekit-fw's gradient oracle.

AdaMerging learns one coefficient per task vector and parameter tensor,
``theta = base + sum_i c[i, l] delta_i[l]``, by minimising the entropy of the
merged model's predictions on unlabelled inputs with Adam; coefficients start at
0.3 and are kept in [0, 1]. Its published settings are used: lr 1e-3, betas
(0.9, 0.999), 16 inputs per task per step, 500 steps.

The oracle's scores at a point are exactly ``d loss / d c[i, l]`` (for a LoRA, the
gradient at a gate on its path; for a full checkpoint, ``<grad, delta>``), so an
AdaMerging step is an Adam step on the score table; memory stays that of one
model plus the adapters' factors, like Frank-Wolfe's.

The entropy is taken where AdaMerging takes it for a classifier: at the model's
prediction of the answer, i.e. the last prompt position (the next token after
``=``). mergekit-fw's own ``entropy`` objective averages every prompt position,
most of which predict the next random input symbol and carry no signal about the
task; keeping them would handicap AdaMerging for a reason that is not its own.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List

import torch

from testbed.sanity import pool_spec, write_coefficients
from mergekit_fw.calibration import CalibrationBatch, CalibrationSet, build_calibration

LOG = logging.getLogger(__name__)
STEPS = 500
LR = 1e-3
INIT = 0.3
BATCH = 16


def answer_positions(calibration: CalibrationSet) -> CalibrationSet:
    """The same batches, counting only each row's last prompt position."""
    batches: List[CalibrationBatch] = []
    counted = torch.zeros(len(calibration.tasks), dtype=torch.float64)
    for batch in calibration.batches:
        positions = torch.zeros_like(batch.positions)
        for row in range(positions.shape[0]):
            last = int(batch.positions[row].nonzero().max())
            positions[row, last] = True
        counted[batch.task] += float(positions.sum())
        batches.append(CalibrationBatch(batch.input_ids, batch.attention_mask, batch.targets, positions, batch.task))
    return CalibrationSet(calibration.tasks, batches, counted, calibration.objective)


def step_batches(calibration: CalibrationSet, step: int) -> List[CalibrationBatch]:
    """One batch of every task for this step, cycling through each task's batches."""
    by_task: Dict[int, List[CalibrationBatch]] = {}
    for batch in calibration.batches:
        by_task.setdefault(batch.task, []).append(batch)
    return [batches[step % len(batches)] for _, batches in sorted(by_task.items())]


def adamerging(cell, calibration_path: Path, out: Path, *, steps: int = STEPS, lr: float = LR, init: float = INIT,
               seed: int = 0) -> Dict[str, object]:
    """Learn the coefficients on the cell's calibration prompts and write the merge to ``out``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mergekit_fw.oracle import Oracle
    from mergekit_fw.pool.pool import open_pool

    started = time.perf_counter()
    torch.manual_seed(seed)
    opened = open_pool(pool_spec(cell.pool, cell.entries))
    tokenizer = AutoTokenizer.from_pretrained(str(cell.pool.base))
    model = LlamaForCausalLM.from_pretrained(str(cell.pool.base), dtype=torch.float32)
    calibration = answer_positions(build_calibration(
        calibration_path, tokenizer, samples_per_task=cell.per_task, batch_size=BATCH, max_length=64, objective="entropy"))
    oracle = Oracle(model, opened, calibration)
    coefficients = torch.full((len(opened.candidates), len(opened.tensor_names())), init, dtype=torch.float64,
                              requires_grad=True)
    optimizer = torch.optim.Adam([coefficients], lr=lr, betas=(0.9, 0.999))
    losses: List[float] = []
    try:
        initial = oracle.loss(coefficients.detach())
        for step in range(steps):
            oracle.batches = step_batches(calibration, step)
            evaluation = oracle.evaluate(coefficients.detach())
            losses.append(evaluation.loss)
            optimizer.zero_grad()
            coefficients.grad = evaluation.scores.clone()  # d entropy / d c
            optimizer.step()
            with torch.no_grad():
                coefficients.clamp_(0.0, 1.0)
        oracle.batches = calibration.batches
        final = oracle.loss(coefficients.detach())
    finally:
        oracle.close()
    write_coefficients(opened, coefficients.detach(), out, str(cell.pool.base))
    tensors = opened.tensor_names()
    mean = {}
    for row, (name, candidate) in enumerate(zip(opened.names, opened.candidates)):
        own = [column for column, tensor in enumerate(tensors) if tensor in candidate.tensor_names()]
        mean[name] = float(coefficients.detach()[row, own].mean())
    return {"steps": steps, "lr": lr, "init": init, "entropy_initial_all": initial, "entropy_first_steps": losses[:5], "entropy_last_steps": losses[-5:],
            "entropy_final_all": final, "mean_coefficients": mean,
            "seconds": round(time.perf_counter() - started, 2)}
