"""Running a test's worker in gloo processes on the CPU (one spawn per module; the tests read its files)."""
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker, world: int, out_dir) -> None:
    """Run `worker(rank, port, out_dir)` in `world` processes and wait for all of them."""
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=True)


def join_group(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
