"""Process-group set-up shared by every job: plain `python -m` (world size 1) or torchrun.

NCCL with one GPU per process when CUDA is available, gloo on CPU. Rank/world size come from
the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK).
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when no process group was created (single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have Linux send `sig` to this process when its parent exits (False where unsupported).

    Used by the torchrun guard and by every rank under torchrun, so that killing a launcher
    (even with SIGKILL) never leaves torchrun or its ranks running on their own.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the torchrun process group if there is one; choose the device.

    `device`: "auto" (cuda:LOCAL_RANK when CUDA exists, else cpu), "cpu", or "cuda".
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: stop when torchrun is gone
        die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = None
    if world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend,
                timeout=datetime.timedelta(minutes=timeout_minutes),
                device_id=dev if use_cuda else None,
            )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def barrier(info: DistInfo) -> None:
    if info.is_distributed and dist.is_initialized():
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.local_rank])
        else:
            dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(info: DistInfo, values: list[float]) -> list[float]:
    """Sum a few Python numbers over ranks (for summaries/counters)."""
    if not info.is_distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def shard_indices(n: int, info: DistInfo) -> list[int]:
    """Rows rank r handles: r, r+W, r+2W, ... (no padding, no repeats)."""
    return list(range(info.rank, n, info.world_size))
