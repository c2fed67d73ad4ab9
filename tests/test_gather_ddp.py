"""`train.gather_batch`: two gloo processes of batch 4 train like one process of batch 8 (BERT, and the BiGRU
text encoder of model.text_backbone bigru).

Full CODER (instance DCL with batch + bank diversity, M-DCL masking the own image, concept DCL, PGC) on a
tiny random model. Each rank takes the rows DistributedSampler would give it (r, r + 2, ...). Under DDP
with gathering, the loss and every parameter gradient must equal a single process's on all 8 rows;
without gathering they must not. The model runs in eval mode so dropout and BatchNorm are deterministic
(BatchNorm statistics are per process on CPU, see docs/gpu.md, Multi-GPU).
"""
import os

import numpy as np
import pytest
import torch
from torch import nn

from coder.config import load_config
from coder.models.bigru import BiGRUBackbone
from coder.models.model import build_itr_model
from coder.models.text import tiny_bert
from coder.step import ContrastiveStep, build_step
from coder.vocab import SPECIALS, WordVocabulary
from tests.ddp import join_group, leave_group, spawn

WORLD, BATCH = 2, 8
OVERRIDES = ["model.region_dim=16", "model.num_regions=5", "model.embed_dim=24", "model.concept.enabled=true",
             "model.concept.gcn_hidden=8", "model.momentum.enabled=true", "model.momentum.queue_size=6",
             "cluster.k=3", "loss.mask_own_image=true"]



def text_backbone(text: str) -> nn.Module:
    if text == "bert":
        return tiny_bert(vocab_size=100)
    vocab = WordVocabulary([*SPECIALS, *(f"w{i}" for i in range(100 - len(SPECIALS)))])
    return BiGRUBackbone(vocab, word_dim=8, hidden=24)  # 24 = embed_dim: pooled without a Linear


def build(gather: bool, text: str = "bert") -> ContrastiveStep:
    cfg = load_config(None, OVERRIDES)
    rng = np.random.default_rng(0)
    concepts = {"counts": rng.integers(1, 9, 7), "cooccurrence": np.ones((7, 7)) - np.eye(7),
                "glove": rng.normal(size=(7, 6)).astype(np.float32)}
    torch.manual_seed(0)
    model = build_itr_model(cfg["model"], text_backbone(text), concepts)
    step = build_step(cfg, model).eval()
    step.gather_batch = gather
    return step


def data() -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 3, 4, 5, 2, 5, 1, 4])
    text_lengths = torch.tensor([6, 3, 7, 2, 5, 7, 4, 6])
    ids = torch.randint(5, 100, (BATCH, 7), generator=g)
    ids[torch.arange(7)[None] >= text_lengths[:, None]] = 0
    batch = {"regions": torch.randn(BATCH, 5, 16, generator=g), "region_lengths": lengths, "input_ids": ids,
             "text_lengths": text_lengths, "index": torch.arange(BATCH), "image_index": torch.arange(BATCH) // 2}
    return batch, torch.tensor([0, 2, 1, 1, 0, 2, 2, 0])  # PGC labels of the 8 pairs


def loss_and_grads(step: nn.Module, batch: dict, labels: torch.Tensor) -> dict:
    loss, _, _ = step(batch, 1, labels)
    loss.backward()
    named = step.module.named_parameters() if isinstance(step, nn.parallel.DistributedDataParallel) \
        else step.named_parameters()
    return {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in named if p.grad is not None}}


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, WORLD, port)
    try:
        batch, labels = data()
        rows = torch.arange(rank, BATCH, WORLD)  # DistributedSampler's share of one global batch
        mine = {k: v[rows] for k, v in batch.items()}
        for gather, text in ((True, "bert"), (False, "bert"), (True, "bigru")):
            step = nn.parallel.DistributedDataParallel(build(gather, text), find_unused_parameters=True)
            torch.save(loss_and_grads(step, mine, labels[rows]),
                       os.path.join(out_dir, f"{gather}_{text}_rank{rank}.pth"))
    finally:
        leave_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gather")
    spawn(worker, WORLD, out_dir)
    batch, labels = data()
    single = {text: loss_and_grads(build(False, text), batch, labels) for text in ("bert", "bigru")}
    load = lambda name: torch.load(out_dir / name, weights_only=True)  # noqa: E731
    return single, {key: [load(f"{key[0]}_{key[1]}_rank{r}.pth") for r in range(WORLD)]
                    for key in ((True, "bert"), (False, "bert"), (True, "bigru"))}


@pytest.mark.parametrize("text", ["bert", "bigru"])
def test_two_gathered_processes_equal_one_process_of_the_global_batch(runs, text):
    single, ranks = runs
    single = single[text]
    assert any("text_encoder.backbone.gru." in name for name in single["grads"]) == (text == "bigru")
    for rank in ranks[True, text]:
        torch.testing.assert_close(rank["loss"], single["loss"], rtol=1e-5, atol=1e-6)
        assert rank["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_without_gathering_each_process_sees_only_its_own_rows(runs):
    single, ranks = runs
    assert all(not torch.allclose(rank["loss"], single["bert"]["loss"], rtol=1e-3) for rank in ranks[False, "bert"])
