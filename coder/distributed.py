"""DistributedDataParallel plumbing for `torchrun` (NCCL on CUDA, gloo on CPU); no-ops in a single process."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_distributed(device_type: str, timeout_minutes: float = 60.0) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); starts the process group when launched by torchrun. The timeout bounds
    how long ranks wait at a collective, e.g. while rank 0 runs k-means or the dev evaluation alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s tensor on every rank (in place); the tensor must have the same shape everywhere."""
    if is_distributed():
        dist.broadcast(tensor, src)
    return tensor


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
