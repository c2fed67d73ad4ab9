"""A training step never waits on the host, as a CUDA run would execute it: the trainer's own loop runs on
`coder.syncs.DeviceDouble` tensors (CPU data that behave as device tensors, so a copy to the CPU or a scalar
read is seen, which a counter on CPU tensors cannot see) and makes at most 2 syncs per step for every method
(benchmarks/host_syncs.py prints the same numbers)."""
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from coder.step import ContrastiveStep
from coder.syncs import DEVICE, DeviceDouble, SyncCounter, to_device_double

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import host_syncs  # noqa: E402

MAX_SYNCS_PER_STEP = host_syncs.MAX_SYNCS_PER_STEP


def test_the_counter_sees_what_a_cpu_run_hides():
    x = to_device_double(torch.arange(6.0).reshape(2, 3))
    cpu = torch.ones(3)
    with SyncCounter() as counter:
        y = (x * 2).sum(0)  # device ops: kernels, no sync
        assert counter.syncs == 0 and counter.ops == 2
        assert type(y) is DeviceDouble and y.device == DEVICE
        moved = torch.ones(4).to(DEVICE, non_blocking=True)  # pinned and asynchronous: no wait
        assert counter.syncs == 0 and type(moved) is DeviceDouble
        assert float(y[1]) == 10.0  # a scalar read
        assert y.cpu().tolist() == [6.0, 10.0, 14.0]  # a device -> host copy
        torch.tensor([3], device=DEVICE)  # a blocking host -> device copy
        assert x[x > 2].numel() == 3  # a boolean mask: a nonzero in disguise
        x.nonzero()
        _ = x + cpu  # a CPU tensor into a device op
        (cpu * 2).sum().item()  # the CPU alone: nothing
    kinds = [where.split(" at ")[0] for where in counter.where.elements()]
    assert sorted(kinds) == sorted(["scalar read", "device-to-host copy", "blocking host-to-device copy",
                                    "boolean-mask index.Tensor", "data-dependent nonzero.default",
                                    "CPU tensor into add.Tensor"]), counter.where
    assert all("tests/test_host_syncs.py" in where for where in counter.where)


def test_an_rnn_call_counts_as_one_kernel_each_way_as_cudnn_runs_it():
    """The CPU runs a GRU as a chain of per-step ops; CUDA as one cuDNN call forward and one backward."""
    from coder.syncs import module_to_device_double

    gru = module_to_device_double(torch.nn.GRU(4, 4, batch_first=True, bidirectional=True))
    packed = pack_padded_sequence(to_device_double(torch.randn(3, 9, 4)), torch.tensor([9, 5, 2]),
                                  batch_first=True)
    with SyncCounter() as counter:
        gru(packed)[0].data.sum().backward()
    assert counter.kernels["rnn (one cuDNN call)"] == counter.kernels["rnn backward (one cuDNN call)"] == 1
    assert counter.syncs == 0 and counter.ops < 20, counter.kernels  # hundreds of per-step ops otherwise


def test_gpo_packs_sorted_as_unsorted_packing_would():
    """GPO packs its CPU-sorted lengths longest first and flips back: the unsorted packing's output."""
    from coder.models.aggregators import GPO, positional_encoding

    torch.manual_seed(0)
    gpo = GPO(8, 8)
    distinct = torch.tensor([1, 3, 4, 7])  # Lengths.distinct: ascending, on the CPU
    pe = positional_encoding(7, 8).expand(len(distinct), -1, -1)
    packed = pack_padded_sequence(pe, distinct, batch_first=True, enforce_sorted=False)
    expected = pad_packed_sequence(gpo.gru(packed)[0], batch_first=True, total_length=7)[0]
    assert torch.equal(gpo.packed_gru(pe, distinct), expected)


@pytest.fixture(scope="module")
def work(tiny_coder_data, tiny_bert_dir, tmp_path_factory):
    return tiny_coder_data, tiny_bert_dir, tmp_path_factory.mktemp("host_syncs")


@pytest.fixture(scope="module")
def triplet(work):
    root, bert, out = work
    return host_syncs.device_trainer("triplet", root, bert, out / "triplet")


def test_a_planted_item_and_a_planted_cpu_copy_in_the_step_are_each_counted(triplet, monkeypatch):
    assert host_syncs.per_step(triplet, steps=1)["syncs_per_step"] == 0
    forward = ContrastiveStep.forward
    for plant, kind in ((lambda loss: loss.item(), "scalar read"),
                        (lambda loss: loss.detach().cpu(), "device-to-host copy")):
        def planted(self, *args, plant=plant):
            out = forward(self, *args)
            plant(out[0])
            return out
        monkeypatch.setattr(ContrastiveStep, "forward", planted)
        found = host_syncs.per_step(triplet, steps=1)
        assert found["syncs_per_step"] == 1, found["where"]
        [(where, count)] = found["where"].items()
        assert where.startswith(kind) and "tests/test_host_syncs.py" in where and count == 1


@pytest.mark.parametrize("method", ["coder", "coder_cvse", "user", "coder_bigru"])
def test_a_step_of_each_method_syncs_at_most_twice_logged_or_not(method, work, triplet):
    root, bert, out = work
    trainer = triplet if method == "triplet" else host_syncs.device_trainer(method, root, bert, out / method)
    for log_every in (1000, 1):
        found = host_syncs.per_step(trainer, steps=1, log_every=log_every)
        assert found["syncs_per_step"] <= MAX_SYNCS_PER_STEP, (log_every, found["where"])
    trainer.log.close()


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


def test_a_logged_step_reads_its_values_in_one_copy_and_logs_each(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from coder.logger import TrainLogger

    terms = {"dcl": torch.tensor(0.25), "pgc": torch.tensor(1.5)}
    diag = {"diversity_v": torch.tensor([0.5, 1.0]), "diversity_w": torch.tensor([2.0, 4.0])}
    log = TrainLogger(tmp_path)
    values = to_device_double((torch.tensor(1.75), terms, diag, {"all": torch.tensor(3.0)}))
    with SyncCounter() as counter:
        log.step(7, *values, lr=0.5, lr_text=0.05, rate=100.0, queue_fill=0.5)
    log.close()
    assert counter.syncs == 1, counter.where
    events = EventAccumulator(str(tmp_path)).Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert logged == {"loss/total": [(7, 1.75)], "loss/dcl": [(7, 0.25)], "loss/pgc": [(7, 1.5)],
                      "train/grad_norm": [(7, 3.0)], "diversity/diversity_v_mean": [(7, 0.75)],
                      "diversity/diversity_v_min": [(7, 0.5)], "diversity/diversity_v_max": [(7, 1.0)],
                      "diversity/diversity_w_mean": [(7, 3.0)], "diversity/diversity_w_min": [(7, 2.0)],
                      "diversity/diversity_w_max": [(7, 4.0)], "train/lr": [(7, 0.5)],
                      "train/lr_text": [(7, pytest.approx(0.05))], "train/samples_per_s": [(7, 100.0)],
                      "queue/fill": [(7, 0.5)]}
    assert log.lines.sums == {"loss": 1.75, "dcl": 0.25, "pgc": 1.5}
