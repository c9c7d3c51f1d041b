"""The gradient oracle: calibration loss and LMO scores at a coefficient table.

LoRA candidates are scored through gates (:mod:`.lora`), full checkpoints through
one dense gradient and streamed deltas (:mod:`.dense`); both fill rows of the same
``(n_candidates, n_tensors)`` score table, in the pool's candidate order.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from mergekit_fw.calibration import CalibrationSet
from mergekit_fw.objective import batch_cross_entropy, token_weights
from mergekit_fw.oracle.dense import DenseMix
from mergekit_fw.oracle.lora import LoraGates
from mergekit_fw.pool import Pool

LOG = logging.getLogger(__name__)


class Oracle:
    def __init__(self, model: nn.Module, pool: Pool, calibration: CalibrationSet, *, progress: bool = False):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pool = pool
        self.calibration = calibration
        self.tensors = pool.tensor_names()
        self.weights = token_weights(calibration)
        self.progress = progress
        self.lora: Optional[LoraGates] = None
        lora = pool.lora_candidates()
        if lora:
            self.lora_columns = [c for c, t in enumerate(self.tensors) if any(t in cand.factors for _, cand in lora)]
            self.lora = LoraGates(self.model, lora, [self.tensors[c] for c in self.lora_columns])
        self.dense: Optional[DenseMix] = None
        if pool.dense_candidates():
            self.dense = DenseMix(self.model, pool.dense_candidates(), self.tensors)
        self._device = next(self.model.parameters()).device
        self._current: Optional[torch.Tensor] = None

    def set_point(self, coefficients: torch.Tensor) -> None:
        """Make the model compute ``theta_0 + sum_i c[i, l] delta_i[l]``."""
        coefficients = coefficients.detach().to(torch.float64).cpu()
        if self._current is not None and torch.equal(coefficients, self._current):
            return
        if self.lora is not None:
            self.lora.set(coefficients, self.lora_columns)
        if self.dense is not None:
            self.dense.set(coefficients)
        self._current = coefficients.clone()

    def _batches(self, desc: str):
        return tqdm(self.calibration.batches, desc=desc, leave=False, disable=not self.progress)

    def _forward(self, batch) -> torch.Tensor:
        out = self.model(
            input_ids=batch.input_ids.to(self._device),
            attention_mask=batch.attention_mask.to(self._device),
            use_cache=False,
        )
        batch_on_device = type(batch)(
            batch.input_ids, batch.attention_mask, batch.labels.to(self._device), batch.task_index.to(self._device)
        )
        return batch_cross_entropy(out.logits, batch_on_device, self.weights.to(self._device))

    @torch.no_grad()
    def loss(self, coefficients: torch.Tensor) -> float:
        self.set_point(coefficients)
        return float(sum(float(self._forward(batch)) for batch in self.calibration.batches))

    def loss_and_scores(self, coefficients: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """Loss at the point and ``score[i, l] = <grad_l, delta_i[l]>`` (float64)."""
        self.set_point(coefficients)
        if self.lora is not None:
            self.lora.gates.grad = None
            self.lora.require_grad(True)
        if self.dense is not None:
            self.dense.require_grad(True)
        total = 0.0
        try:
            for batch in self._batches("oracle"):
                loss = self._forward(batch)
                loss.backward()
                total += float(loss.detach())
            scores = torch.zeros(len(self.pool.candidates), len(self.tensors), dtype=torch.float64)
            if self.lora is not None:
                lora_scores = self.lora.scores().cpu()
                for k, row in enumerate(self.lora.candidate_rows):
                    scores[row, self.lora_columns] = lora_scores[k]
            if self.dense is not None:
                dense_scores = self.dense.scores()
                for k, (row, _) in enumerate(self.dense.candidates):
                    scores[row] += dense_scores[k]
        finally:
            if self.lora is not None:
                self.lora.require_grad(False)
                self.lora.gates.grad = None
            if self.dense is not None:
                self.dense.require_grad(False)
        return total, scores

    def close(self) -> None:
        if self.lora is not None:
            self.lora.remove()
