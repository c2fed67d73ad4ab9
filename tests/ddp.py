"""Running a test's worker in gloo processes on the CPU (one spawn per module; the tests read its files)."""
import datetime
import faulthandler
import os
import socket
import warnings

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker, world: int, out_dir, tries: int = 2) -> None:
    """Run `worker(rank, port, out_dir)` in `world` processes and wait for all of them.

    A worker that raises fails the test at once. A worker killed by a signal (seen once on a 2-core CI machine:
    gloo's `terminate called without an active exception`, SIGABRT, in a run that passes alone) is retried on
    a fresh port, once, with a warning; `faulthandler` has printed where it died to the captured stderr."""
    for attempt in range(1, tries + 1):
        try:
            mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=True)
            return
        except mp.ProcessExitedException as err:  # not ProcessRaisedException: a Python error is never retried
            if attempt == tries or err.signal_name is None:
                raise
            warnings.warn(f"gloo worker {err.error_index} died ({err}); spawning the {world} workers again")


def join_group(rank: int, world: int, port: int, timeout_s: float | None = None) -> None:
    """Join the gloo group; with `timeout_s`, a rank left waiting at a collective fails in that many seconds."""
    faulthandler.enable()  # a native abort prints every thread's Python stack
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)


def leave_group() -> None:
    """Every rank reaches the end before any tears the group down (rank 0 hosts the store the others use)."""
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
