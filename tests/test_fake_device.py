"""The sync-free step on a device other than the CPU, without one: FakeTensorMode tensors on `meta` carry no
data, and fake tensors refuse to meet tensors of another device, so a CPU tensor reaching device code fails.

Fake *CUDA* tensors cannot run kernels on a CPU-only PyTorch (the device guard aborts the process), hence
`meta`. `pack_padded_sequence`'s output size depends on the lengths' values, which fake tensors do not have:
the first test pools by mean, the per-method steps replace GPO's packed GRU by the unpacked one (same
parameters and shapes), checking packing's device rule instead.
"""
import numpy as np
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from coder.data.collate import collate
from coder.lengths import Lengths
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


COMMON = ["model.region_dim=16", "model.num_regions=5", "model.embed_dim=24", "model.momentum.queue_size=6"]
METHODS = {  # one row of each method the configs train, with the GPO heads of the real configs
    "triplet": ["loss.instance=triplet", "model.momentum.enabled=false", "model.concept.enabled=false",
                "loss.memory_weight=0.0", "loss.concept_weight=0.0", "loss.pgc_weight=0.0"],
    "coder": ["model.concept.enabled=true", "model.concept.gcn_hidden=8", "model.momentum.enabled=true",
              "cluster.k=3", "loss.mask_own_image=true"],
    "coder_cvse": ["model.concept.enabled=true", "model.concept.gcn_hidden=8", "model.momentum.enabled=true",
                   "cluster.k=3", "model.concept.query_source=instance", "model.concept.detach_query=true",
                   "model.concept.encoder=cvse", "model.concept.score=cvse", "model.concept.share_query=true"],
    "user": ["model.user.sge=true", "model.user.cge=true", "model.user.clip_dim=12", "data.clip_features=true",
             "data.region_dropout=0.0", "loss.instance=uto",
             "model.momentum.enabled=true", "model.concept.enabled=false", "loss.concept_weight=0.0",
             "loss.pgc_weight=0.0"],
}


def unpacked_gru(self, pe, distinct):
    """GPO's packed GRU without packing (whose output size depends on the lengths' values, which fake tensors
    lack), with packing's own device rule: the encodings on the device, the lengths on the CPU."""
    assert pe.device.type == DEVICE and distinct.device.type == "cpu", (pe.device, distinct.device)
    return self.gru(pe)[0]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_training_step_of_each_method_runs_on_a_fake_device(method, monkeypatch):
    from coder.config import load_config
    from coder.models.aggregators import GPO
    from coder.models.model import build_itr_model
    from coder.step import build_step

    monkeypatch.setattr(GPO, "packed_gru", unpacked_gru)
    cfg = load_config(None, COMMON + METHODS[method])
    rng = np.random.default_rng(0)
    concepts = {"counts": rng.integers(1, 9, 7), "cooccurrence": np.ones((7, 7)) - np.eye(7),
                "glove": rng.normal(size=(7, 6)).astype(np.float32)}
    torch.manual_seed(0)
    model = build_itr_model(cfg["model"], tiny_bert(vocab_size=100), concepts if cfg["model"]["concept"]["enabled"]
                            else None)
    step = build_step(cfg, model).train()
    regions = 5 if method == "user" else None  # SGE needs every region
    items = [{"regions": torch.randn(regions or n, 16), "input_ids": torch.randint(1, 100, (n + 2,)),
              "image_index": i // 2, "index": i, "clip": torch.randn(12)} for i, n in enumerate((3, 5, 2, 4))]
    batch = collate(items)
    labels = torch.tensor([0, 2, 1, 1])
    with FakeTensorMode(allow_non_fake_inputs=True):
        to_fake(step)
        moved = {k: v._with(fake) if isinstance(v, Lengths) else fake(v) for k, v in batch.items()}
        loss, terms, _ = step(moved, 1, fake(labels))
        loss.backward()
        assert loss.device.type == DEVICE and all(t.device.type == DEVICE for t in terms.values())
        grads = [p.grad for p in step.parameters() if p.grad is not None]
        assert grads and all(g.device.type == DEVICE for g in grads)
