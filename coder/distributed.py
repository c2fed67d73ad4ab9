"""DistributedDataParallel plumbing for `torchrun` (NCCL on CUDA, gloo on CPU); no-ops in a single process."""
from __future__ import annotations

import datetime
import os
import random

import numpy as np
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


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


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


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """True on every rank when `flag` is true on any rank (an all-reduce MAX), so that a failure seen by one
    rank stops them all instead of leaving the others waiting at the next collective until the timeout."""
    if not is_distributed():
        return flag
    value = flag.to(torch.int32).reshape(1).clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value[0].bool()


def gather_objects(obj) -> list:
    """Every rank's (picklable) `obj` in rank order, on every rank; `[obj]` in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def offset_seeds(seed: int, rank_: int) -> None:
    """Per-rank random streams (dropout) after the model is built from the common seed: rank 0 keeps its
    stream, rank r > 0 is reseeded, so ranks draw different dropout masks on their different data while the
    parameters started identical (DDP also broadcasts rank 0's parameters and buffers when it wraps the model).
    Augmentation needs no offset: its generator is a function of (seed, epoch, caption index)."""
    if rank_ > 0:
        seed_streams(seed + 1_000_003 * rank_)


def seed_streams(seed: int) -> None:
    """Python's, numpy's and torch's (CPU and every CUDA device) generators from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def wrap_ddp(module: torch.nn.Module, device: torch.device, find_unused: bool) -> torch.nn.Module:
    """DistributedDataParallel without re-broadcasting buffers each step: the queues, their ids and the concept
    graph are kept identical on every rank by construction (enqueue gathers every rank's keys; X and A_hat are
    fixed), so a per-step broadcast of two 4,096 x 1,024 queues would be pure traffic. Parameters and buffers
    are still broadcast from rank 0 once, at construction."""
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused, broadcast_buffers=False)


def all_gather_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's rows of each tensor, concatenated in rank order (ranks may hold different row counts);
    the tensors themselves in a single process. No gradient."""
    if not is_distributed():
        return list(tensors)
    world, rows = dist.get_world_size(), tensors[0].shape[0]
    length = torch.tensor([rows], dtype=torch.long, device=tensors[0].device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    lengths = [int(n) for n in lengths]
    gathered_tensors = []
    for tensor in tensors:
        padded = tensor.new_zeros((max(lengths), *tensor.shape[1:]))  # all_gather needs equal shapes
        padded[:rows] = tensor
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        gathered_tensors.append(torch.cat([g[:n] for g, n in zip(gathered, lengths)]))
    return gathered_tensors


def all_gather_equal_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's rows of each tensor, concatenated in rank order, when every rank holds as many rows (a
    training step's batch: the sampler and the loader drop the last, uneven batch); the tensors themselves in a
    single process. No gradient. Unlike `all_gather_rows` no row count is exchanged and read back, so a step
    does not wait for the device (a mismatch stops the collective with an error)."""
    if not is_distributed():
        return list(tensors)
    out = []
    for tensor in tensors:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        out.append(torch.cat(parts))
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' rows in rank order; the backward hands each rank the gradient of its own rows summed over
    every rank's loss (an all-reduce, which gloo supports, instead of a reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows, ctx.rank = tensor.size(0), dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `tensor` (equal row counts), concatenated in rank order, differentiable.

    Each rank then computes the same loss over the whole global batch; DDP averages the parameter gradients
    over ranks, and the backward's sum over ranks makes that average the gradient of the one global-batch
    loss, as a single process with the global batch would compute it (open_clip's `gather_with_grad`)."""
    return _GatherWithGrad.apply(tensor) if is_distributed() else tensor


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
