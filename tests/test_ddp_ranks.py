"""What every rank of a DDP run must share, and what it must not (2 gloo processes on CPU, one spawn).

- a non-finite loss on rank 1 alone stops both ranks with NonFiniteLossError, within seconds (the flag is
  all-reduced before it is checked; otherwise rank 0 would wait at the next collective until the timeout);
- `rng_state()` gathers each rank's own generators (CUDA mocked: each rank's device state is its rank);
- without per-step buffer broadcasts (`dist.wrap_ddp`), the queues, their ids and the concept graph (X,
  A_hat) stay identical on both ranks over several training steps, since enqueue gathers every rank's keys.
"""
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist

from coder import checkpoint
from coder import distributed as dist
from coder.engine import NonFiniteLossError, check_finite
from tests.ddp import join_group, leave_group, spawn
from tests.test_gather_ddp import build, data

WORLD, STEPS = 2, 4
SHARED_BUFFERS = ("queue_v.features", "queue_v.ids", "queue_w.features", "queue_w.ids", "word_vectors",
                  "adjacency")


def gathered_rng(rank: int) -> list[int]:
    """The CUDA states rank 0 receives, with each rank's mocked device state filled with its rank."""
    saved = torch.cuda.is_available, torch.cuda.get_rng_state
    torch.cuda.is_available = lambda: True
    torch.cuda.get_rng_state = lambda: torch.full((16,), rank, dtype=torch.uint8)
    try:
        return [int(state["cuda"][0]) for state in checkpoint.rng_state()["ranks"]]
    finally:
        torch.cuda.is_available, torch.cuda.get_rng_state = saved


def train_steps(rank: int) -> dict:
    """STEPS training steps of full CODER on this rank's rows, as Trainer.train_epoch runs them."""
    torch.manual_seed(0)
    step = dist.wrap_ddp(build(gather=True).train(), torch.device("cpu"), find_unused=True)
    optimizer = torch.optim.Adam(step.parameters(), lr=1e-3)
    batch, labels = data()
    for i in range(STEPS):
        rows = torch.randperm(8, generator=torch.Generator().manual_seed(i))[rank::WORLD]
        mine = {k: v[rows] for k, v in batch.items()}
        loss, _, _ = step(mine, 1, labels[rows])  # in training mode the step enqueues its keys itself
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    buffers = dict(step.module.named_buffers())  # the model's and the momentum encoders' banks
    return {"broadcast_buffers": step.broadcast_buffers,
            **{name: next(v for k, v in buffers.items() if k.endswith(name)) for name in SHARED_BUFFERS}}


def nan_on_rank_one(rank: int, out_dir: str) -> dict:
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)
    tic = time.perf_counter()
    try:
        check_finite(~torch.isfinite(loss), 0, 3, Path(out_dir))
        torch_dist.barrier()  # the next collective of the loop
        error = "none"
    except Exception as err:  # noqa: BLE001 - the test reads which error each rank ended with
        error = type(err).__name__
    return {"error": error, "seconds": time.perf_counter() - tic}


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a short timeout: a rank left waiting at a collective fails the test in a minute instead of hanging it
    join_group(rank, WORLD, port, timeout_s=60)
    try:
        result = {"rng": gathered_rng(rank), "buffers": train_steps(rank)}
        result["nan"] = nan_on_rank_one(rank, out_dir)  # last: it ends the ranks' work
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pth"))
    finally:
        leave_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp_ranks")
    spawn(worker, WORLD, out_dir)
    return [torch.load(out_dir / f"rank{r}.pth", weights_only=True) for r in range(WORLD)]


def test_a_nan_on_one_rank_stops_every_rank_at_once(ranks):
    for rank in ranks:
        assert rank["nan"]["error"] == NonFiniteLossError.__name__
        assert rank["nan"]["seconds"] < 10


def test_every_rank_saves_its_own_cuda_state(ranks):
    assert ranks[0]["rng"] == [0, 1]


def test_buffers_stay_identical_across_ranks_without_broadcasts(ranks):
    rank0, rank1 = (r["buffers"] for r in ranks)
    assert rank0["broadcast_buffers"] is False
    assert (rank0["queue_v.ids"] >= 0).all()  # the queues have been written to, not just left as initialised
    for name in SHARED_BUFFERS:
        assert torch.equal(rank0[name], rank1[name]), name
