"""Several processes, one worker: the torch.distributed plumbing of a ``torchrun`` launch.

``torchrun --nproc-per-node N -m fedmoe worker ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in their environment. Each rank trains on
its share of every global micro-batch under PyTorch DDP (NCCL on CUDA, gloo on CPU);
only rank 0 talks to the coordinator. What crosses between ranks is tensors: JSON text
as bytes, the LoRA parameters, counters and flags, never pickled objects.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from fedmoe.worker.speed import SpeedSetupError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a rank waits in a collective for the others (rank 0 may be retrying a
#: coordinator that is down during setup): then the job fails with a clear error.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class RankFailure(RuntimeError):
    """Another rank died or stopped answering: the job stops (rank 0 uploads first)."""


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set up more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@dataclass(frozen=True)
class DistContext:
    """This process's place among the worker's ranks, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that talks to the coordinator."""
        return self.rank == 0

    def shard(self, batch: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a global micro-batch (sizes differ by ≤ 1)."""
        size, extra = divmod(len(batch), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return list(batch[start : start + size + (self.rank < extra)])

    # --- collectives -----------------------------------------------------------------------

    def sum_int(self, value: int) -> int:
        """The sum of ``value`` over all ranks."""
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return int(tensor.item())

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over all ranks."""
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def any_flags(self, *flags: bool) -> list[bool]:
        """For each flag: whether any rank set it."""
        tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [bool(v) for v in tensor.tolist()]

    def gather_ints(self, value: int) -> list[int]:
        """``value`` of every rank, in rank order."""
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        return [int(t.item()) for t in every]

    def broadcast_json(self, value: Any) -> Any:
        """Rank 0's JSON-serialisable ``value`` on every rank (others pass None)."""
        data = json.dumps(value).encode() if self.is_main else b""
        length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(length, src=0)
        buffer = torch.zeros(int(length.item()), dtype=torch.uint8, device=self.device)
        if self.is_main:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buffer, src=0)
        return json.loads(bytes(buffer.cpu().tolist()).decode())

    @torch.no_grad()
    def broadcast_parameters(self, parameters: Sequence[torch.Tensor]) -> None:
        """Overwrite ``parameters`` on every rank with rank 0's, in one flat broadcast."""
        flat = torch.cat([p.detach().reshape(-1).float() for p in parameters])
        dist.broadcast(flat, src=0)
        offset = 0
        for parameter in parameters:
            count = parameter.numel()
            parameter.copy_(flat[offset : offset + count].view_as(parameter))
            offset += count


def device_for_rank(option: str, local_rank: int) -> torch.device:
    """CUDA device ``local_rank`` when CUDA is used, else the CPU; others are refused."""
    wants_cuda = option.startswith("cuda") or (option == "auto" and torch.cuda.is_available())
    if wants_cuda:
        if option not in ("auto", "cuda"):
            logger.warning(
                "--device %s ignored under torchrun: rank uses cuda:%d", option, local_rank
            )
        return torch.device("cuda", local_rank)
    if option not in ("auto", "cpu"):
        raise SpeedSetupError(
            f"--device {option}: multi-process workers run on CUDA (NCCL) or CPU (gloo)"
        )
    return torch.device("cpu")


def init_from_env(device_option: str) -> DistContext:
    """Join the process group torchrun prepared (NCCL on CUDA, gloo on CPU)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device_for_rank(device_option, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    logger.info("rank %d of %d on %s (%s)", rank, world, device, backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    """Leave the process group (if joined); never raises."""
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as error:  # a dead peer can make teardown fail: nothing left to do
        logger.debug("process group teardown: %s", error)


def leave_process(code: int = 0) -> NoReturn:
    """End a rank whose job is done (process group left, files written) at once.

    The interpreter's own teardown can abort a gloo rank after a clean run: C++ objects
    still alive then (e.g. the gradient reducer's finished work, holding tensors) are
    destroyed while Python is being finalized, and the process dies with SIGABRT
    ("terminate called without an active exception"; pytorch/pytorch#179291), which
    torchrun reports as the job failing. Logs and standard streams are flushed first.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
