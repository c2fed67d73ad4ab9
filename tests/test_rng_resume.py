"""Random states in a checkpoint restore on any device and any number of processes (CUDA mocked on CPU).

A GPU run loads its checkpoint with map_location=cuda: every tensor of the nested RNG dict (the per-rank
list, numpy's keys inside a dict) arrives on the GPU, and the CUDA and numpy setters need CPU tensors. Here
"another device" is `meta`, whose `.cpu()` hands back the tensor it came from (as a device copy would).
"""
import random
import warnings

import numpy as np
import pytest
import torch

from coder import checkpoint
from coder import distributed as dist
from coder.models.text import tiny_bert


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


def scramble() -> None:
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)


def nested_map(fn, value):
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, dict):
        return {k: nested_map(fn, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(nested_map(fn, v) for v in value)
    return value


@pytest.fixture
def on_meta(monkeypatch):
    """Moves every tensor of a nested state to `meta`; their `.cpu()` returns the original values."""
    originals, cpu = {}, torch.Tensor.cpu

    def to_meta(tensor):
        moved = tensor.to("meta")
        originals[id(moved)] = tensor
        return moved

    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: originals[id(self)] if self.is_meta
                        else cpu(self, *a, **k))
    return lambda state: nested_map(to_meta, state)


def test_states_loaded_on_another_device_restore(on_meta):
    torch.manual_seed(3)
    state = checkpoint.rng_state()
    expected = draws()
    moved = on_meta(state)
    assert moved["ranks"][0]["numpy"]["keys"].is_meta  # nested tensors really are elsewhere
    scramble()
    checkpoint.set_rng_state(moved)
    assert draws() == expected


def test_older_checkpoints_with_one_state_for_every_visible_gpu_restore(on_meta):
    """The format before per-rank states: rank 0's generators, "cuda" the list of its visible GPUs'."""
    torch.manual_seed(4)
    legacy = {**checkpoint._local_rng_state(), "cuda": []}
    expected = draws()
    scramble()
    checkpoint.set_rng_state(on_meta(legacy))
    assert draws() == expected


class FakeCuda:
    """torch.cuda's RNG functions for a machine where rank r drives device r; records what is set."""

    def __init__(self, monkeypatch):
        self.device, self.set, self.seeded = 0, [], []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.device)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: self.state_of(self.device))
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: self.set.append(state.clone()))
        monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: self.seeded.append(seed))

    @staticmethod
    def state_of(device: int) -> torch.Tensor:
        return torch.full((16,), 100 + device, dtype=torch.uint8)


def saved_by_two_ranks(monkeypatch, cuda: FakeCuda) -> tuple[dict, list]:
    """A checkpoint's rng entry as 2 ranks write it (each rank seeded apart), and each rank's next draws."""
    states, expected = [], []
    for rank in range(2):
        cuda.device = rank
        torch.manual_seed(50 + rank)
        states.append(checkpoint._local_rng_state())
        expected.append(draws())
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "gather_objects", lambda obj: states)
    return checkpoint.rng_state(), expected


@pytest.mark.parametrize("world", [1, 2, 4])
def test_two_saved_ranks_restore_on_one_two_and_four(monkeypatch, world):
    cuda = FakeCuda(monkeypatch)
    saved, expected = saved_by_two_ranks(monkeypatch, cuda)
    monkeypatch.setattr(dist, "world_size", lambda: world)
    streams = []
    for rank in range(world):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        cuda.device = rank
        scramble()
        cuda.set, cuda.seeded = [], []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            checkpoint.set_rng_state(saved, seed=7)
        streams.append(draws())
        if world == 2:  # each rank continues its own streams, its own GPU's included
            assert not caught
            assert len(cuda.set) == 1 and torch.equal(cuda.set[0], FakeCuda.state_of(rank))
            assert streams[rank] == expected[rank]
        else:  # a clear warning (once, from rank 0), and fresh streams that differ between ranks
            assert [str(w.message) for w in caught if w.category is RuntimeWarning] == (
                ["the checkpoint holds random states of 2 process(es) but this run has "
                 f"{world}: every rank starts fresh random streams (dropout differs from an uninterrupted run)"]
                if rank == 0 else [])
            assert not cuda.set and len(cuda.seeded) == 1
            assert streams[rank] not in expected
    assert len({str(s) for s in streams}) == world


def test_rank_offsets_keep_parameters_identical_and_dropout_apart():
    masks, params = [], []
    for rank in range(2):
        torch.manual_seed(0)
        model = tiny_bert(vocab_size=50)
        dist.offset_seeds(0, rank)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        masks.append(torch.nn.functional.dropout(torch.ones(1000), 0.5))
    assert torch.equal(params[0], params[1])
    assert not torch.equal(masks[0], masks[1])
    torch.manual_seed(0)
    tiny_bert(vocab_size=50)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(1000), 0.5), masks[0])  # rank 0 as one process
