"""The contract of one training step (coder/step.py, CODER §3.2 with MoCo's order of operations):

- the keys come from the key encoders *after* their momentum update (theta_k <- m theta_k + (1 - m) theta_q);
- what enters the banks is this step's keys, with their image ids (not the query embeddings);
- the loss sees the banks as they were before the step (a snapshot, not the buffer the enqueue writes);
- a loss registered from outside coder/ trains; a batch field a term declares reaches it.
"""
import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

from coder.config import load_config
from coder.losses import INSTANCE_LOSSES, register_instance_loss
from coder.models.model import build_itr_model
from coder.models.momentum import momentum_update
from coder.models.text import tiny_bert
from coder.step import ContrastiveStep, Objective, build_step
from tests.ddp import join_group, leave_group, spawn

B, QUEUE = 6, 12
OVERRIDES = ["model.region_dim=16", "model.num_regions=5", "model.embed_dim=24", "model.momentum.enabled=true",
             f"model.momentum.queue_size={QUEUE}", "model.momentum.m=0.5", "model.concept.enabled=true",
             "model.concept.gcn_hidden=8", "cluster.k=3"]


def concepts():
    rng = np.random.default_rng(0)
    return {"counts": rng.integers(1, 9, 7), "cooccurrence": np.ones((7, 7)) - np.eye(7),
            "glove": rng.normal(size=(7, 6)).astype(np.float32)}


def build(extra=()):
    cfg = load_config(None, OVERRIDES + list(extra))
    torch.manual_seed(0)
    model = build_itr_model(cfg["model"], tiny_bert(vocab_size=100), concepts())
    for module in model.modules():  # no dropout: the keys can then be recomputed exactly
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    step = build_step(cfg, model).train()
    return cfg, step, torch.optim.Adam([p for p in step.parameters() if p.requires_grad], lr=1e-2)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (B,), generator=g)
    text_lengths = torch.randint(2, 8, (B,), generator=g)
    ids = torch.randint(5, 100, (B, 7), generator=g)
    ids[torch.arange(7)[None] >= text_lengths[:, None]] = 0
    index = torch.randperm(40, generator=g)[:B]
    return {"regions": torch.randn(B, 5, 16, generator=g), "region_lengths": lengths, "input_ids": ids,
            "text_lengths": text_lengths, "index": index, "image_index": index // 5}


def train_step(step, optimizer, data):
    loss, _, _ = step(data, 0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def expected_keys(step, data):
    """The keys as MoCo defines them: a copy of the key encoders, momentum-updated from the current query
    encoders, encodes the batch."""
    model, momentum = step.model, step.momentum
    key_image, key_text = copy.deepcopy(momentum.key_image_encoder), copy.deepcopy(momentum.key_text_encoder)
    momentum_update(key_image, model.image_encoder, momentum.m)
    momentum_update(key_text, model.text_encoder, momentum.m)
    with torch.no_grad():
        return (key_image(data["regions"], data["region_lengths"]),
                key_text(data["input_ids"], data["text_lengths"])[0])


def test_the_banks_receive_this_steps_momentum_keys_with_their_image_ids():
    _, step, optimizer = build()
    train_step(step, optimizer, batch(1))  # the query encoders move away from the key encoders
    data = batch(2)
    v_key, w_key = expected_keys(step, data)
    with torch.no_grad():
        queries = step.model(data["regions"], data["region_lengths"], data["input_ids"], data["text_lengths"])
        stale_v = step.momentum.key_image_encoder(data["regions"], data["region_lengths"])
    # the three candidates differ, so each wrong one is told apart from the right one
    assert not torch.allclose(v_key, queries["v_i"], atol=1e-4) and not torch.allclose(v_key, stale_v, atol=1e-4)
    train_step(step, optimizer, data)
    queue_v, queue_w = step.momentum.queue_v, step.momentum.queue_w
    slots = torch.arange(B, 2 * B)  # the second batch follows the first in the FIFO
    torch.testing.assert_close(queue_v.features[slots], v_key, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(queue_w.features[slots], w_key, rtol=1e-5, atol=1e-6)
    assert torch.equal(queue_v.ids[slots], data["image_index"]) and torch.equal(queue_w.ids[slots],
                                                                                 data["image_index"])


def test_the_loss_sees_the_banks_as_they_were_before_the_step(monkeypatch):
    _, step, optimizer = build()
    train_step(step, optimizer, batch(1))
    before = step.momentum.queue_v.features.clone(), step.momentum.queue_w.ids.clone()
    seen, forward = {}, Objective.forward

    def spy(self, out, fields, epoch, bank=None, labels=None):
        seen["bank"] = bank  # compared after the step's enqueue: a live buffer would have changed by then
        return forward(self, out, fields, epoch, bank, labels)

    monkeypatch.setattr(Objective, "forward", spy)
    train_step(step, optimizer, batch(2))
    assert torch.equal(seen["bank"].v, before[0]) and torch.equal(seen["bank"].ids_w, before[1])
    assert not torch.equal(step.momentum.queue_v.features, before[0])  # the step did enqueue


def test_evaluation_mode_leaves_the_banks_alone():
    _, step, _ = build()
    step.eval()
    before = step.momentum.queue_v.features.clone()
    with torch.no_grad():
        step(batch(1), 0)
    assert torch.equal(step.momentum.queue_v.features, before)


SEEN: list = []


def toy_positive(x):
    """A toy instance loss (1 - mean positive cosine) that declares a batch field and records it."""
    SEEN.append(x.fields["text_lengths"].clone())
    return 1.0 - x.sims.diagonal().mean()


def register_toy():
    register_instance_loss("toy_positive", toy_positive, batch_fields=("text_lengths",))


@pytest.fixture
def toy_loss():
    register_toy()
    SEEN.clear()
    yield
    INSTANCE_LOSSES.pop("toy_positive")


def test_a_loss_registered_outside_coder_trains_a_step(toy_loss):
    cfg, step, optimizer = build(["loss.instance=toy_positive", "model.concept.enabled=false",
                                  "model.momentum.enabled=false"])
    assert list(step.objective.weights) == ["instance"]
    data = batch(3)
    first, _, _ = step(data, 0)
    train_step(step, optimizer, data)
    after, _, _ = step(data, 0)
    assert SEEN and torch.equal(SEEN[0], data["text_lengths"])
    assert float(after.detach()) < float(first.detach())  # the step lowered the toy loss


def test_loss_keys_no_term_reads_are_rejected():
    from coder.config import ConfigError

    with pytest.raises(ConfigError, match="'loss.margin' is set"):
        build(["loss.margin=0.3"])  # a DCL objective has no margin
    with pytest.raises(ConfigError, match="'loss.uto_alpha' is set"):
        build(["loss.uto_alpha=50"])


def gather_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, 2, port)
    try:
        register_toy()
        _, step, _ = build(["loss.instance=toy_positive", "model.concept.enabled=false",
                            "model.momentum.enabled=false"])
        ddp = nn.parallel.DistributedDataParallel(ContrastiveStep(step.model, step.objective, step.momentum,
                                                                  gather_batch=True))
        data = batch(10 + rank)
        loss, _, _ = ddp(data, 0)
        loss.backward()
        torch.save({"mine": data["text_lengths"], "seen": SEEN[0]}, os.path.join(out_dir, f"{rank}.pth"))
    finally:
        leave_group()


def test_a_declared_batch_field_arrives_gathered_from_every_rank(tmp_path):
    spawn(gather_worker, 2, tmp_path)
    ranks = [torch.load(tmp_path / f"{r}.pth", weights_only=True) for r in range(2)]
    everyone = torch.cat([r["mine"] for r in ranks])  # rank order
    assert all(torch.equal(r["seen"], everyone) for r in ranks)


def test_the_worked_example_of_adding_a_loss_trains(monkeypatch):
    """docs/adding-a-loss.md, run as written: the function, the registry line, the config key; then a step with
    it lowers it, and its key set under another loss is refused."""
    import re
    from pathlib import Path

    from coder.config import DEFAULTS, SCHEMA, ConfigError

    page = (Path(__file__).parent.parent / "docs" / "adding-a-loss.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 3
    namespace: dict = {}
    try:
        for block in blocks:
            exec(block, namespace)
        cfg, step, optimizer = build(["loss.instance=positive_pull", "loss.pull=1.0", "model.concept.enabled=false",
                                      "model.momentum.enabled=false"])
        assert cfg["loss"]["pull"] == 1.0 and list(step.objective.weights) == ["instance"]
        data = batch(4)
        first, terms, _ = step(data, 0)
        expected = namespace["positive_pull"](step.model(data["regions"], data["region_lengths"], data["input_ids"],
                                                         data["text_lengths"])["v_i"].float() @
                                              step.model(data["regions"], data["region_lengths"], data["input_ids"],
                                                         data["text_lengths"])["w_i"].float().t(), 1.0)
        torch.testing.assert_close(terms["instance"], expected)
        optimizer = torch.optim.Adam([p for p in step.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(3):
            train_step(step, optimizer, data)
        after, _, _ = step(data, 0)
        assert float(after.detach()) < float(first.detach())
        with pytest.raises(ConfigError, match="'loss.pull' is set"):
            build(["loss.pull=2.0"])  # the default objective (DCL) does not read it
    finally:
        INSTANCE_LOSSES.pop("positive_pull", None)
        SCHEMA.pop("loss.pull", None)
        DEFAULTS["loss"].pop("pull", None)
