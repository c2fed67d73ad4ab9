"""Two gloo processes: the banks' enqueue and the image heads' global BatchNorm make no host sync as a CUDA
run would execute them (counted on `coder.syncs.DeviceDouble` tensors), and the global BatchNorm of 2 ranks of
batch 4 is one BatchNorm of batch 8: output, input and parameter gradients, running statistics."""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from tests.ddp import join_group, leave_group, spawn

WORLD, ROWS, CHANNELS = 2, 4, 6


def batchnorm_case():
    torch.manual_seed(0)
    return torch.randn(WORLD * ROWS, CHANNELS) * 3 + 1, torch.randn(WORLD * ROWS, CHANNELS)


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, WORLD, port, timeout_s=120)
    try:
        from coder.batchnorm import GlobalBatchNorm
        from coder.distributed import all_gather_rows
        from coder.models.momentum import FeatureQueue
        from coder.syncs import SyncCounter, collectives_on_device_doubles, module_to_device_double, to_device_double

        result = {}
        # the banks' enqueue, twice (the second wraps around), on device doubles
        queue = module_to_device_double(FeatureQueue(6, 3))
        keys = to_device_double(torch.full((ROWS, 3), float(rank)))
        ids = to_device_double(torch.arange(ROWS) + 10 * rank)
        with collectives_on_device_doubles(), SyncCounter() as counter:
            queue.enqueue(keys, ids)
            queue.enqueue(keys, ids)
        result["enqueue_syncs"] = dict(counter.where)
        result["queue_ids"] = queue.ids.elem.tolist()
        with collectives_on_device_doubles(), SyncCounter() as counter:  # the counter sees the row-count path
            all_gather_rows(keys, ids)
        result["row_count_syncs"] = counter.syncs

        # the global BatchNorm: forward and backward of this rank's rows
        x_all, w_all = batchnorm_case()
        mine = slice(rank * ROWS, (rank + 1) * ROWS)
        bn = GlobalBatchNorm(CHANNELS, momentum=None)
        x = x_all[mine].clone().requires_grad_(True)
        y = bn(x)
        (y * w_all[mine]).sum().backward()
        grads = torch.cat([bn.weight.grad, bn.bias.grad])
        torch.distributed.all_reduce(grads)  # what DDP sums (and averages) over ranks
        result.update(y=y.tolist(), x_grad=x.grad.tolist(), param_grads=grads.tolist(),
                      running=[bn.running_mean.tolist(), bn.running_var.tolist()])

        # ... and its host syncs on device doubles
        module_to_device_double(bn)
        x = to_device_double(x_all[mine].clone()).requires_grad_(True)
        with collectives_on_device_doubles(), SyncCounter() as counter:
            (bn(x) * to_device_double(w_all[mine])).sum().backward()
        result["batchnorm_syncs"] = dict(counter.where)
        result["batchnorm_ops"] = counter.ops
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        leave_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("syncs_ddp")
    spawn(worker, WORLD, out_dir)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_enqueue_makes_no_sync_and_both_ranks_hold_every_key(runs):
    for run in runs:
        assert run["enqueue_syncs"] == {}
        assert run["row_count_syncs"] == 3  # the row-count exchange it replaced: one copy up, two reads
        # 2 x 8 keys through 6 slots: the second batch's rank-0 ids 2, 3 and rank-1 ids 10-13, wrapped
        assert sorted(run["queue_ids"]) == [2, 3, 10, 11, 12, 13]
    assert runs[0]["queue_ids"] == runs[1]["queue_ids"]


def test_global_batchnorm_of_two_ranks_is_one_batchnorm_of_the_whole_batch(runs):
    x_all, w_all = batchnorm_case()
    bn = nn.BatchNorm1d(CHANNELS, momentum=None)
    x = x_all.clone().requires_grad_(True)
    y = bn(x)
    (y * w_all).sum().backward()
    np.testing.assert_allclose(np.concatenate([r["y"] for r in runs]), y.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([r["x_grad"] for r in runs]), x.grad.numpy(), rtol=1e-4, atol=1e-5)
    for run in runs:
        np.testing.assert_allclose(run["param_grads"], torch.cat([bn.weight.grad, bn.bias.grad]).numpy(),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(run["running"], [bn.running_mean.numpy(), bn.running_var.numpy()],
                                   rtol=1e-4, atol=1e-5)


def test_global_batchnorm_makes_no_sync(runs):
    for run in runs:
        assert run["batchnorm_syncs"] == {} and run["batchnorm_ops"] > 0


def test_only_the_image_side_gets_the_global_batchnorm():
    """The image encoders (heads, USER's SGE/CGE, their momentum copies, the concept branch's image query
    head) are converted; the concept encoders' BatchNorm (CVSE's form) and the text side are not."""
    from coder.batchnorm import GlobalBatchNorm, global_batchnorm_within
    from coder.config import load_config
    from coder.models.heads import ImageHead
    from coder.models.model import ImageEncoder, build_itr_model
    from coder.models.text import tiny_bert

    cfg = load_config(None, ["model.region_dim=16", "model.embed_dim=24", "model.concept.enabled=true",
                             "model.concept.gcn_hidden=8", "model.concept.encoder=cvse",
                             "model.momentum.enabled=true", "model.momentum.queue_size=6"])
    rng = np.random.default_rng(0)
    concepts = {"counts": rng.integers(1, 9, 7), "cooccurrence": np.ones((7, 7)) - np.eye(7),
                "glove": rng.normal(size=(7, 6)).astype(np.float32)}
    model = build_itr_model(cfg["model"], tiny_bert(vocab_size=100), concepts)
    before = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    global_batchnorm_within(model, (ImageEncoder, ImageHead))
    after = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)}
    assert set(after) == set(before)
    converted = sorted(name for name, kind in after.items() if kind is GlobalBatchNorm)
    kept = sorted(name for name, kind in after.items() if kind is nn.BatchNorm1d)
    assert converted and all(n.startswith(("image_encoder.", "momentum.key_image_encoder.",
                                           "concept.image_query_head.")) for n in converted), converted
    assert any(n.startswith("concept.") for n in kept), kept  # the concept encoders' BatchNorm
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # same parameters and statistics
