"""Data parallel solves: calibration batches split over processes, sums all-reduced.

The calibration objective is a plain sum over batches with weights fixed by the
whole set (:mod:`mergekit_fw.objective`), so each process can take every
``world_size``-th batch, and the loss, the per-task losses and the score tables
are exact after one sum over processes. Every process then holds the same
numbers and takes the same Frank-Wolfe decisions; only the main process writes
(checkpoints, the cached table, the output folder).

Processes come from ``accelerate launch`` (or ``torchrun``): the environment
names the rank and the world size, and Accelerate opens the process group (gloo
on CPU, NCCL on GPUs). A plain ``mergekit-fw run`` is a world of one and none of
this costs anything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

LOG = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share: every ``world_size``-th item from ``rank``."""
        return list(items[self.rank :: self.world_size])

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes, in place; returned on its own device."""
        if not self.parallel:
            return tensor
        import torch.distributed as dist

        if self.device.type == "cpu" or tensor.device == self.device:
            dist.all_reduce(tensor)
            return tensor
        on_device = tensor.to(self.device)
        dist.all_reduce(on_device)
        tensor.copy_(on_device.to(tensor.device))
        return tensor

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value`` on every process (any picklable object)."""
        if not self.parallel:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        if self.parallel:
            import torch.distributed as dist

            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (say, materialising a cache), the
        others after it has finished and then find the work done."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


_CURRENT: Processes | None = None


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def current() -> Processes:
    """This process's place in the run; opens the process group on first use when
    the launcher started several processes."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    if launched_world_size() <= 1:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        _CURRENT = Processes(device=device)
        return _CURRENT
    from accelerate import PartialState

    # cpu=True on GPU-less machines: otherwise Accelerate takes a launch without
    # a GPU for a single process and never opens the gloo group
    state = PartialState(cpu=not torch.cuda.is_available())
    _CURRENT = Processes(rank=state.process_index, world_size=state.num_processes, device=torch.device(state.device))
    LOG.info("data parallel: process %d of %d on %s", _CURRENT.rank, _CURRENT.world_size, _CURRENT.device)
    return _CURRENT


def shutdown() -> None:
    """Close the process group (a clean exit for the launcher)."""
    global _CURRENT
    if _CURRENT is not None and _CURRENT.parallel:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    _CURRENT = None
