"""A training step never waits on the host: the operations that read a device value back are counted over
real training steps on the CPU (full CODER and USER) and stay at most 2 per step."""
import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from coder.config import load_config
from coder.engine import Trainer

aten = torch.ops.aten
# each of these makes the host wait for the device: a scalar read (.item(), int(), bool()), an output whose
# size depends on values, a Python bool out of a comparison
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
           aten.is_nonzero.default, aten._unique.default, aten._unique2.default, aten.unique_dim.default,
           aten.unique_consecutive.default, aten.unique_dim_consecutive.default}
MAX_SYNCS_PER_STEP = 2
RNN_FILES = ("torch/nn/modules/rnn.py", "torch/nn/utils/rnn.py")


def _has_bool_index(indices) -> bool:
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices if i is not None)


class SyncCounter(TorchDispatchMode):
    """Counts the host-syncing operations dispatched while active, by name."""

    def __init__(self):
        super().__init__()
        self.counts, self.where = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            self._count(str(func))
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and _has_bool_index(args[1]):
            self._count(f"{func} (bool mask)")  # a mask index is a nonzero() in disguise
        return func(*args, **kwargs)

    def _count(self, name: str) -> None:
        stack = traceback.extract_stack()
        # a PackedSequence's batch_sizes stays on the CPU on every device (PyTorch keeps it there), so the
        # GRU reading batch_sizes[0] is a host read, not a sync; on a CPU run it looks like one
        if "_local_scalar_dense" in name and any(f.filename.endswith(RNN_FILES) for f in stack[-8:]):
            return
        self.counts[name] += 1
        frames = [f for f in stack if "/coder/" in f.filename]
        self.where[f"{name} at {frames[-1].filename.split('/coder/')[-1]}:{frames[-1].lineno}" if frames else name] += 1


class PausedLoader:
    """The trainer's loader with the counter paused while a batch is read: collate's work on the CPU,
    before the batch moves to the device, is what a step should do instead of syncing."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            with _disable_current_modes():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def __len__(self):
        return len(self.loader)


def count_syncs(trainer: Trainer, epoch: int, steps: int) -> Counter:
    trainer.cfg["train"]["max_steps_per_epoch"] = steps
    trainer.step_in_epoch = 0
    loader, trainer.train_loader = trainer.train_loader, PausedLoader(trainer.train_loader)
    try:
        with SyncCounter() as counter:
            trainer.train_epoch(epoch)
    finally:
        trainer.train_loader = loader
    assert trainer.step_in_epoch == steps
    return counter.where


def per_step_syncs(trainer: Trainer, epoch: int) -> Counter:
    """Syncs of 4 steps: an epoch of 6 steps minus one of 2, so the epoch's set-up and end cancel out."""
    long, short = count_syncs(trainer, epoch, 6), count_syncs(trainer, epoch, 2)
    long.subtract(short)
    return +long


def tiny(config, root, bert_dir, *overrides):
    return load_config(config, [
        f"data.root={root}", f"model.text_encoder={bert_dir}", "model.text_layers=2", "model.region_dim=16",
        "model.embed_dim=16", "model.momentum.queue_size=16", "train.batch_size=8", "train.epochs=2",
        "train.device=cpu", "train.log_every=1000", "train.save_every=0", "eval.batch_size=20", *overrides])


@pytest.fixture(scope="module")
def coder_trainer(tiny_coder_data, tiny_bert_dir, tmp_path_factory):
    cfg = tiny("configs/demo.yaml", tiny_coder_data, tiny_bert_dir,
               f"model.concept.vocab={tiny_coder_data / 'concepts.npz'}",
               "cluster.k=7", "data.region_dropout=0.2")
    trainer = Trainer(cfg, tmp_path_factory.mktemp("coder_syncs"), progress=False)
    trainer.update_clusters(1)  # PGC on: the step reads k-means labels
    assert trainer.objective.needs_labels(1)
    assert trainer.step.momentum is not None and trainer.model.concept is not None
    return trainer


def test_a_full_coder_step_syncs_at_most_twice(coder_trainer):
    syncs = per_step_syncs(coder_trainer, 1)
    assert sum(syncs.values()) <= MAX_SYNCS_PER_STEP * 4, dict(syncs)


def test_a_user_step_syncs_at_most_twice(tiny_coder_data, tiny_bert_dir, tmp_path):
    cfg = tiny("configs/demo_user.yaml", tiny_coder_data, tiny_bert_dir, "data.clip_features=false",
               "model.user.cge=false")
    trainer = Trainer(cfg, tmp_path, progress=False)
    assert trainer.model.image_encoder.sge is not None and trainer.step.momentum is not None
    syncs = per_step_syncs(trainer, 0)
    assert sum(syncs.values()) <= MAX_SYNCS_PER_STEP * 4, dict(syncs)


def test_precomputed_lengths_give_the_tensor_lengths_numbers():
    """The sync-free path (Lengths from collate) equals the plain-tensor path, forward and backward."""
    from coder.data.collate import collate
    from coder.models.heads import ImageHead, TextHead
    from coder.models.text import TextBackbone, tiny_bert

    torch.manual_seed(0)
    items = [{"regions": torch.randn(n, 8), "input_ids": torch.randint(1, 100, (n + 2,))} for n in (3, 7, 2, 7, 5)]
    batch = collate(items)
    image, text = ImageHead(8, 16), TextHead(16, 16)
    backbone = TextBackbone(tiny_bert(vocab_size=100, hidden=16, layers=2, heads=2)).eval()
    outputs = []
    for region_lengths, text_lengths in ((batch["region_lengths"], batch["text_lengths"]),
                                         (batch["region_lengths"].lengths, batch["text_lengths"].lengths)):
        image.zero_grad()
        v = image(batch["regions"], region_lengths)
        w = text(backbone(batch["input_ids"], text_lengths), text_lengths)
        (v @ w.t()).square().sum().backward()
        outputs.append((v, w, [p.grad.clone() for p in image.parameters()]))
    (v0, w0, g0), (v1, w1, g1) = outputs
    assert torch.equal(v0, v1) and torch.equal(w0, w1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
