"""FeatureQueue gathers the keys of every DDP rank before enqueue (2 gloo processes on CPU).

One spawn runs every scenario (process start-up dominates the cost); the tests check its output.
"""

import os

import pytest
import torch

from coder.models.momentum import FeatureQueue
from tests.ddp import join_group, leave_group, spawn

WORLD = 2
SIZE, DIM = 10, 3
# per scenario, per enqueue step: the batch size of each rank
SCENARIOS = {"equal": [[3, 3]], "unequal": [[3, 5], [2, 1]]}
# final image ids slot by slot, written by hand: rank 0's keys (ids 0, 1, ...) then rank 1's (10, 11, ...)
EXPECTED_IDS = {
    "equal": [0, 1, 2, 10, 11, 12, -1, -1, -1, -1],
    "unequal": [10, 1, 2, 10, 11, 12, 13, 14, 0, 1],  # step 2 (0, 1, 10) wraps into slot 0
}



def rank_keys(rank: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct, recognisable keys per rank: row r of rank k is filled with 10*k + r (its id too)."""
    ids = 10 * rank + torch.arange(batch)
    return ids.float()[:, None].expand(batch, DIM).clone(), ids


def worker(rank: int, port: int, out_dir: str) -> None:
    join_group(rank, WORLD, port)
    try:
        for name, steps in SCENARIOS.items():
            torch.manual_seed(0)  # same seed on every rank: same random start
            queue = FeatureQueue(SIZE, DIM)
            for sizes in steps:  # a training step's batches are equal (drop_last); other callers say so
                queue.enqueue(*rank_keys(rank, sizes[rank]), equal_rows=len(set(sizes)) == 1)
            torch.save(queue.state_dict(), os.path.join(out_dir, f"{name}_rank{rank}.pth"))
    finally:
        leave_group()


@pytest.fixture(scope="module")
def rank_states(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp_queue")
    spawn(worker, WORLD, out_dir)
    return {
        name: [torch.load(out_dir / f"{name}_rank{r}.pth", weights_only=True) for r in range(WORLD)]
        for name in SCENARIOS
    }


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ranks_share_gathered_queue(rank_states, scenario):
    rank0, rank1 = rank_states[scenario]
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert rank0["ids"].tolist() == EXPECTED_IDS[scenario]
    written = rank0["ids"] >= 0
    assert torch.equal(rank0["features"][written], rank0["ids"][written].float()[:, None].expand(-1, DIM))
    total = sum(sum(sizes) for sizes in SCENARIOS[scenario])
    assert int(rank0["ptr"]) == total % SIZE and int(rank0["filled"]) == min(total, SIZE)

    # the same as one process enqueueing rank 0's keys then rank 1's, step by step
    torch.manual_seed(0)
    single = FeatureQueue(SIZE, DIM)
    for sizes in SCENARIOS[scenario]:
        parts = [rank_keys(r, sizes[r]) for r in range(WORLD)]
        single.enqueue(torch.cat([k for k, _ in parts]), torch.cat([i for _, i in parts]))
    for name, value in single.state_dict().items():
        assert torch.equal(rank0[name], value), name
