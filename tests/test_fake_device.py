"""The sync-free step on a device other than the CPU, without one: FakeTensorMode tensors on `meta` carry no
data, and fake tensors refuse to meet tensors of another device, so a CPU tensor reaching device code fails.

Fake *CUDA* tensors cannot run kernels on a CPU-only PyTorch (the device guard aborts the process), hence
`meta`. The GPO aggregator is left out: `pack_padded_sequence`'s output size depends on the lengths' values,
which fake tensors do not have; the heads here pool by mean instead.
"""
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from coder.data.collate import collate
from coder.models.aggregators import Lengths
from coder.models.heads import ImageHead, TextHead
from coder.models.momentum import FeatureQueue
from coder.models.text import TextBackbone, tiny_bert

DEVICE = "meta"


def fake(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=DEVICE)


def to_fake(module: nn.Module) -> nn.Module:
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = fake(b)
    return module


def test_heads_packed_bert_and_queue_run_on_a_fake_device():
    torch.manual_seed(0)
    batch = collate([{"regions": torch.randn(n, 8), "input_ids": torch.randint(1, 100, (n + 2,)), "image_index": n}
                     for n in (3, 5, 2)])
    image, text = ImageHead(8, 16, aggregator="mean"), TextHead(16, 16, aggregator="mean")
    backbone = TextBackbone(tiny_bert(vocab_size=100, hidden=16, layers=1, heads=2))
    assert backbone.packed
    queue = FeatureQueue(4, 16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in (image, text, backbone, queue):
            to_fake(module)
        moved = {k: v._with(fake) if isinstance(v, Lengths) else fake(v) for k, v in batch.items()}
        v = image(moved["regions"], moved["region_lengths"])
        w = text(backbone(moved["input_ids"], moved["text_lengths"]), moved["text_lengths"])
        (v @ w.t()).sum().backward()
        queue.enqueue(w.detach(), moved["image_index"])
        assert v.device.type == w.device.type == DEVICE
        assert all(p.grad is not None and p.grad.device.type == DEVICE for p in image.parameters())
    assert queue.fill_fraction() == 3 / 4
