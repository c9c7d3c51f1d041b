"""The gradient oracle: calibration loss and LMO scores at a coefficient table.

LoRA candidates are scored through gates (:mod:`.lora`), full checkpoints (and
every candidate when the merge function is TIES) through one dense gradient and
streamed deltas (:mod:`.dense`); both fill rows of the same
``(n_candidates, n_tensors)`` score table, in the pool's candidate order.
Calibration batches never mix tasks, so per-task scores (soft FW's task-wise
top-k) come from harvesting the accumulated gradients at each task boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mergekit_fw.calibration.batches import CalibrationSet, with_answers
from mergekit_fw.distributed import Processes
from mergekit_fw.merge_fn import MergeFunction
from mergekit_fw.objective import batch_loss, position_weights
from mergekit_fw.oracle.dense import DenseMix
from mergekit_fw.oracle.half_backward import route_linear_backward
from mergekit_fw.oracle.lora import LoraGates, input_device
from mergekit_fw.oracle.tied import untie_head
from mergekit_fw.pool.pool import Pool
from mergekit_fw.pool.rows import delta_norm

LOG = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """Loss and scores at one point; per-task parts when asked for."""

    loss: float
    scores: torch.Tensor  # (n_candidates, n_tensors) float64
    task_losses: torch.Tensor  # (n_tasks,) float64, sums to ``loss``
    task_scores: torch.Tensor | None = None  # (n_tasks, n_candidates, n_tensors)


class Oracle:
    def __init__(
        self,
        model: nn.Module,
        pool: Pool,
        calibration: CalibrationSet,
        *,
        merge: MergeFunction | None = None,
        progress: bool = False,
        processes: Processes | None = None,
    ):
        """``merge``: a non-linear merge function (TIES); then every candidate takes
        the dense path, since gates can only express weighted sums. ``processes``:
        this process's share of a data parallel run (its batches; sums reduced)."""
        self.model = model.eval()
        _keep_checkpointing(self.model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        route_linear_backward(self.model)
        if pool.base_index.untied:
            untie_head(self.model)
        self.pool = pool
        self.calibration = calibration
        self.processes = processes or Processes()
        self.batches = self.processes.shard(calibration.batches)
        self.objective = calibration.objective
        self.tensors = pool.tensor_names()
        self.weights = position_weights(calibration)
        self.progress = progress
        self.lora: LoraGates | None = None
        lora = pool.lora_candidates() if merge is None else []
        if lora:
            self.lora_columns = [c for c, t in enumerate(self.tensors) if any(t in cand.factors for _, cand in lora)]
            self.lora = LoraGates(self.model, lora, [self.tensors[c] for c in self.lora_columns])
        everyone = list(enumerate(pool.candidates))
        dense = [(i, c) for i, c in everyone if c.dense_tensor_names()] if merge is None else everyone
        self.dense: DenseMix | None = DenseMix(self.model, dense, self.tensors, merge) if dense else None
        self._device = input_device(self.model)
        self._current: torch.Tensor | None = None
        self._norms: torch.Tensor | None = None
        self.held: frozenset[int] = frozenset()  # candidate rows held at 0 (``hold``)
        # rows pushed through the model, forward only and forward + backward: what a
        # solve spent, in rows (passes over the calibration set = rows / its rows)
        self.forward_rows = 0
        self.backward_rows = 0

    def hold(self, rows: Collection[int]) -> None:
        """Hold candidate rows ``rows`` (and only those) at 0, as a screened solve does
        with its dropped members: their paths and delta streams leave the model, so a
        pass costs what the kept members' does, their scores read 0, and a point that
        moves them is refused. An empty ``rows`` puts every member back."""
        held = frozenset(rows)
        if held == self.held:
            return
        if self.lora is not None:
            self.lora.hold({k for k, row in enumerate(self.lora.candidate_rows) if row in held})
        if self.dense is not None:
            self.dense.hold(held)
        self.held = held
        self._current = None  # the model no longer computes the point it did
        LOG.info("oracle: %d of %d candidate rows held at 0, out of the model", len(held), len(self.pool.candidates))

    def set_point(self, coefficients: torch.Tensor) -> None:
        """Make the model compute the merge at coefficients ``c[i, l]``."""
        coefficients = coefficients.detach().to(torch.float64).cpu()
        if self._current is not None and torch.equal(coefficients, self._current):
            return
        if self.held and bool(coefficients[sorted(self.held)].any()):
            moved = [self.pool.candidates[row].name for row in sorted(self.held) if bool(coefficients[row].any())]
            raise ValueError(f"coefficients on members held at 0: {', '.join(moved)}")
        if self.lora is not None:
            self.lora.set(coefficients, self.lora_columns)
        if self.dense is not None:
            self.dense.set(coefficients)
        self._current = coefficients.clone()

    def _batches(self, desc: str, batches: list | None = None):
        return tqdm(self.batches if batches is None else batches, desc=desc, leave=False, disable=not self.progress)

    @property
    def rows(self) -> int:
        """Rows of this process's share of the calibration set (one pass)."""
        return sum(int(b.input_ids.shape[0]) for b in self.processes.shard(self.calibration.batches))

    def passes(self) -> dict[str, float]:
        """Passes over the calibration set spent so far: forward-only, and gradient
        (forward + backward)."""
        rows = max(self.rows, 1)
        return {"forward": self.forward_rows / rows, "gradient": self.backward_rows / rows}

    @torch.no_grad()
    def decode_answers(self, coefficients: torch.Tensor, pad_id: int) -> None:
        """Decode ``answer_tokens - 1`` tokens greedily after every prompt at this
        point and count the positions that predict them from now on. Done once, at the
        starting point, so the entropy objective stays one fixed function of the
        coefficients (a line search compares values of the same function)."""
        extra = self.calibration.answer_tokens - 1
        if extra <= 0:
            return
        self.set_point(coefficients)
        decoded = []
        for batch in self._batches("answers"):
            ids, mask = batch.input_ids.clone(), batch.attention_mask.clone()
            ends = mask.sum(dim=1)
            answers = torch.zeros((ids.shape[0], extra), dtype=torch.long)
            for k in range(extra):
                if int(ends.max()) >= ids.shape[1]:
                    ids = torch.nn.functional.pad(ids, (0, 1), value=pad_id)
                    mask = torch.nn.functional.pad(mask, (0, 1), value=0)
                logits = self.model(
                    input_ids=ids.to(self._device), attention_mask=mask.to(self._device), use_cache=False
                ).logits
                rows = torch.arange(ids.shape[0])
                token = logits[rows.to(logits.device), (ends - 1).to(logits.device)].argmax(dim=-1).cpu()
                answers[:, k] = token
                ids[rows, ends] = token
                mask[rows, ends] = 1
                ends = ends + 1
                self.forward_rows += int(ids.shape[0])
            decoded.append(with_answers(batch, answers, pad_id))
        self.batches = decoded

    def _forward(self, batch) -> torch.Tensor:
        batch = batch.to(self._device)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return batch_loss(out.logits, batch, self.weights.to(self._device), self.objective)

    @torch.no_grad()
    def loss(self, coefficients: torch.Tensor) -> float:
        self.set_point(coefficients)
        total = torch.zeros(1, dtype=torch.float64)
        for batch in self._batches("loss"):
            total += float(self._forward(batch))
            self.forward_rows += int(batch.input_ids.shape[0])
        return float(self.processes.sum_(total))

    @torch.no_grad()
    def task_losses(self, coefficients: torch.Tensor) -> torch.Tensor:
        """The loss on each calibration task's rows at the point (one forward pass): what
        the screen reads when it ranks members by what each does alone (``screen_by: loss``)."""
        self.set_point(coefficients)
        losses = torch.zeros(len(self.calibration.tasks), dtype=torch.float64)
        for batch in self._batches("loss"):
            losses[batch.task] += float(self._forward(batch))
            self.forward_rows += int(batch.input_ids.shape[0])
        return self.processes.sum_(losses)

    def _harvest(self) -> torch.Tensor:
        """Scores from the gradients accumulated so far; the gradients are then cleared."""
        scores = torch.zeros(len(self.pool.candidates), len(self.tensors), dtype=torch.float64)
        if self.lora is not None:
            lora_scores = self.lora.scores().cpu()
            for k, row in enumerate(self.lora.candidate_rows):
                scores[row, self.lora_columns] = lora_scores[k]
            self.lora.gates.grad = None
        if self.dense is not None:
            dense_scores = self.dense.scores()
            for k, (row, _) in enumerate(self.dense.candidates):
                scores[row] += dense_scores[k]
            self.dense.clear_grad()
        return scores

    def evaluate(
        self, coefficients: torch.Tensor, *, per_task: bool = False, batches: list | None = None
    ) -> Evaluation:
        """Loss at the point and ``score[i, l] = <grad_l, delta_i[l]>`` (float64).
        ``batches``: some of this process's batches instead of all of them (a stochastic
        step); the loss and scores are then those batches' additive share."""
        self.set_point(coefficients)
        n_tasks = len(self.calibration.tasks)
        task_losses = torch.zeros(n_tasks, dtype=torch.float64)
        task_scores = (
            torch.zeros(n_tasks, len(self.pool.candidates), len(self.tensors), dtype=torch.float64)
            if per_task
            else None
        )
        if self.lora is not None:
            self.lora.gates.grad = None
            self.lora.require_grad(True)
        if self.dense is not None:
            self.dense.require_grad(True)
        batches = self.batches if batches is None else batches
        try:
            for index, batch in enumerate(self._batches("oracle", batches)):
                loss = self._forward(batch)
                loss.backward()
                self.backward_rows += int(batch.input_ids.shape[0])
                task_losses[batch.task] += float(loss.detach())
                last_of_task = index + 1 == len(batches) or batches[index + 1].task != batch.task
                if task_scores is not None and last_of_task:
                    task_scores[batch.task] += self._harvest()
            if task_scores is not None:
                scores = self.processes.sum_(task_scores).sum(dim=0)
            else:
                scores = self.processes.sum_(self._harvest())
            self.processes.sum_(task_losses)
        finally:
            if self.lora is not None:
                self.lora.require_grad(False)
                self.lora.gates.grad = None
            if self.dense is not None:
                self.dense.require_grad(False)
        return Evaluation(float(task_losses.sum()), scores, task_losses, task_scores)

    def loss_and_scores(self, coefficients: torch.Tensor) -> tuple[float, torch.Tensor]:
        evaluation = self.evaluate(coefficients)
        return evaluation.loss, evaluation.scores

    def vertex_norms(self) -> torch.Tensor:
        """``||delta_i[l]||_F`` per candidate and tensor (cosine LMO scores); computed once."""
        if self._norms is None:
            norms = torch.zeros(len(self.pool.candidates), len(self.tensors), dtype=torch.float64)
            for column, name in enumerate(self.tensors):
                for row, candidate in enumerate(self.pool.candidates):
                    if name in candidate.tensor_names():
                        norms[row, column] = delta_norm(candidate, name, self.pool.base_index)
            self._norms = norms
        return self._norms

    def close(self) -> None:
        if self.lora is not None:
            self.lora.remove()


def _keep_checkpointing(model: nn.Module) -> None:
    """transformers only checkpoints layers in training mode; switch on exactly the
    checkpointed layers (not recursively), so dropout and the like stay off."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True
