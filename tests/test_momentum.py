"""Momentum update, key encoder and FIFO feature queue (CODER §3.2, MoCo)."""

import pytest
import torch
from torch import nn

from coder.models.momentum import FeatureQueue, make_key_encoder, momentum_update


def small_encoder(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_momentum_update_blends_params_and_copies_buffers():
    query = small_encoder(0)
    key = make_key_encoder(query)
    with torch.no_grad():
        for p in query.parameters():
            p.add_(torch.randn_like(p))
    query.train()
    query(torch.randn(8, 4))  # moves BatchNorm running stats and num_batches_tracked
    old_key = {k: v.clone() for k, v in key.state_dict().items()}
    m = 0.9
    momentum_update(key, query, m)
    for name, q in query.named_parameters():
        expected = m * old_key[name] + (1 - m) * q.detach()
        assert torch.allclose(dict(key.named_parameters())[name], expected, rtol=1e-6, atol=1e-7), name
    for name, q in query.named_buffers():
        assert torch.equal(dict(key.named_buffers())[name], q), name
    assert int(key[1].num_batches_tracked) == 1


def test_momentum_update_extremes_and_ddp_like_wrapper():
    query, key = small_encoder(1), small_encoder(2)
    before = [p.clone() for p in key.parameters()]
    momentum_update(key, query, 1.0)
    assert all(torch.equal(p, b) for p, b in zip(key.parameters(), before))
    momentum_update(key, query, 0.0)
    assert all(torch.equal(p, q) for p, q in zip(key.parameters(), query.parameters()))
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(key, query, 1.5)
    with pytest.raises(ValueError, match="parameter"):
        momentum_update(nn.Linear(4, 3), query, 0.5)


def test_key_encoder_is_frozen_copy_keeping_mode():
    query = small_encoder(3).eval()
    key = make_key_encoder(query)
    assert all(not p.requires_grad for p in key.parameters())
    assert all(p.requires_grad for p in query.parameters())
    assert not key.training
    assert all(k.data_ptr() != q.data_ptr() for k, q in zip(key.parameters(), query.parameters()))
    x = torch.randn(5, 4)
    assert torch.equal(key(x), query(x))
    assert not key(x).requires_grad


def keys_for(batch: int, start: int, dim: int = 2):
    values = torch.arange(start, start + batch, dtype=torch.float32)
    return torch.stack([values, -values], dim=1)[:, :dim], torch.arange(start, start + batch) + 100


def test_queue_init():
    torch.manual_seed(0)
    queue = FeatureQueue(8, 5)
    assert torch.allclose(queue.features.norm(dim=1), torch.ones(8))
    assert (queue.ids == -1).all() and int(queue.ptr) == 0 and queue.fill_fraction() == 0.0
    assert set(queue.state_dict()) == {"features", "ids", "ptr", "filled"}


def test_queue_fifo_wraparound_size10_batches3():
    queue = FeatureQueue(10, 2)
    initial = queue.features.clone()
    for step in range(4):  # 12 keys into 10 slots
        keys, ids = keys_for(3, 3 * step)
        queue.enqueue(keys, ids)
        if step == 0:
            assert torch.equal(queue.features[3:], initial[3:])  # untouched slots keep the init
            assert queue.fill_fraction() == 0.3
    slot_key = torch.tensor([10, 11, 2, 3, 4, 5, 6, 7, 8, 9], dtype=torch.float32)
    assert torch.equal(queue.features, torch.stack([slot_key, -slot_key], dim=1))
    assert torch.equal(queue.ids, slot_key.long() + 100)
    assert int(queue.ptr) == 2 and queue.fill_fraction() == 1.0


def test_queue_batch_larger_than_size_keeps_newest():
    queue = FeatureQueue(4, 2)
    queue.enqueue(*keys_for(1, 0))  # ptr 1
    queue.enqueue(*keys_for(6, 10))  # keys 10..15, newest four are 12..15 written from slot 3
    slot_key = torch.tensor([13, 14, 15, 12], dtype=torch.float32)
    assert torch.equal(queue.features[:, 0], slot_key)
    assert torch.equal(queue.ids, slot_key.long() + 100)
    assert int(queue.ptr) == (1 + 6) % 4 and queue.fill_fraction() == 1.0


def test_queue_state_dict_round_trip(tmp_path):
    queue = FeatureQueue(10, 3)
    queue.enqueue(torch.nn.functional.normalize(torch.randn(7, 3), dim=1), torch.arange(7))
    path = tmp_path / "queue.pth"
    torch.save(queue.state_dict(), path)
    restored = FeatureQueue(10, 3)
    restored.load_state_dict(torch.load(path, weights_only=True))
    for name, value in queue.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    assert int(restored.ptr) == 7 and restored.fill_fraction() == 0.7


def test_queue_enqueue_detaches_and_validates():
    queue = FeatureQueue(5, 3)
    keys = torch.randn(2, 3, requires_grad=True)
    queue.enqueue(keys, torch.tensor([4, 5]))
    assert not queue.features.requires_grad
    with pytest.raises(ValueError, match=r"keys must be \(B, 3\)"):
        queue.enqueue(torch.randn(2, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="ids"):
        queue.enqueue(torch.randn(2, 3), torch.tensor([1, 2, 3]))
