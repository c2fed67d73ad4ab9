"""CUDA settings checked on the CPU: TF32 only in the training step, what train.deterministic sets, and
the DataLoader workers data.num_workers gives (the flags are plain attributes without a GPU)."""
import os
from types import SimpleNamespace

import pytest
import torch

from coder.config import ConfigError, load_config
from coder.data.workers import loader_options, resolve_num_workers
from coder.engine import Trainer, seed_everything
from coder.precision import tf32


def matmul_in_tf32() -> bool:
    matmul = torch.backends.cuda.matmul
    return matmul.fp32_precision == "tf32" if hasattr(matmul, "fp32_precision") else matmul.allow_tf32


def test_tf32_context_sets_and_restores_the_switch():
    before = torch.backends.cuda.matmul.fp32_precision
    with tf32(True):
        assert matmul_in_tf32()
        with tf32(False):
            assert not matmul_in_tf32()
        assert matmul_in_tf32()
    assert torch.backends.cuda.matmul.fp32_precision == before


class FitProbe:
    """Just enough of a Trainer for `_fit`: records whether TF32 was on in each stage."""

    def __init__(self, cfg):
        self.cfg, self.epoch, self.step_in_epoch, self.labels, self.progress = cfg, 0, 0, None, False
        self.best_rsum, self.val_beta, self.seen = -1.0, 1.0, {}
        self.objective = SimpleNamespace(needs_labels=lambda epoch: True)
        self.log = SimpleNamespace(epoch_end=lambda *args: None)
        self.clock = SimpleNamespace(seconds=lambda: 0.0)

    def update_clusters(self, epoch):
        self.seen["kmeans"] = matmul_in_tf32()

    def train_epoch(self, epoch):
        self.seen["train"] = matmul_in_tf32()

    def validate(self, epoch):
        self.seen["dev ranking"] = matmul_in_tf32()
        return 1.0

    def save_best(self):
        pass

    def save_last(self):
        pass

    def test(self):
        self.seen["test ranking"] = matmul_in_tf32()


@pytest.mark.parametrize("on", [True, False])
def test_tf32_reaches_the_training_step_only(on):
    probe = FitProbe(load_config(None, ["train.epochs=1", f"train.tf32={str(on).lower()}"]))
    with tf32(True):  # even a process that turned TF32 on globally assigns clusters and ranks in IEEE float32
        Trainer._fit(probe)
    assert probe.seen == {"kmeans": False, "train": on, "dev ranking": False, "test ranking": False}


def test_tf32_is_off_by_default():
    assert load_config(None)["train"]["tf32"] is False


def test_deterministic_sets_what_cuda_needs(monkeypatch):
    calls = []
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, **kw: calls.append((on, kw)))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    seed_everything(0, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert calls == [(True, {"warn_only": True})]
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own (smaller) workspace is kept
    seed_everything(0, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_not_deterministic_leaves_cuda_alone(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seed_everything(0, deterministic=False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_auto_workers_from_the_cpus_of_each_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_num_workers("auto", "cpu") == 0
    assert resolve_num_workers(3, "cpu") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_num_workers("auto", "cuda") == 8  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_num_workers("auto", "cuda") == 3  # 4 CPUs each, one for the training process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert resolve_num_workers("auto", "cuda") == 1


def test_loader_options_on_cuda_pin_memory_and_keep_the_tokenizer_fork_safe(monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    assert loader_options(0, "cpu") == {"num_workers": 0, "pin_memory": False, "persistent_workers": False}
    assert "TOKENIZERS_PARALLELISM" not in os.environ  # nothing forks: nothing to set
    assert loader_options(2, "cuda") == {"num_workers": 2, "pin_memory": True, "persistent_workers": False}
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


@pytest.mark.parametrize("value", ["-1", "many", "1.5"])
def test_num_workers_must_be_auto_or_a_count(value):
    with pytest.raises(ConfigError, match="data.num_workers"):
        load_config(None, [f"data.num_workers={value}"])


def test_num_workers_accepts_auto_and_counts():
    assert load_config(None)["data"]["num_workers"] == "auto"
    assert load_config(None, ["data.num_workers=0"])["data"]["num_workers"] == 0


@pytest.mark.parametrize("device, sync, synced", [("cuda", True, True), ("cuda", False, False), ("cpu", True, False)])
def test_ddp_syncs_batchnorm_on_cuda_only_when_asked(monkeypatch, device, sync, synced):
    """train.sync_batchnorm under DDP on CUDA gives the image side's BatchNorms statistics over the global batch
    (GlobalBatchNorm, docs/gpu.md); the text side and the concept encoders keep theirs, and on the CPU nothing
    changes. A PGC classifier unused before cluster.start_epoch makes DDP look for unused parameters."""
    from coder import engine
    from coder.batchnorm import GlobalBatchNorm
    from coder.models.heads import ImageHead

    wrapped = []
    monkeypatch.setattr(engine.dist, "wrap_ddp", lambda module, on, find_unused: wrapped.append(find_unused) or module)
    for prototypes in (None, torch.nn.Linear(2, 3)):
        image = ImageHead(4, 4, "mean")
        step = torch.nn.ModuleDict({"image": image, "text": torch.nn.Sequential(torch.nn.BatchNorm1d(2))})
        step.objective = SimpleNamespace(prototypes=prototypes)
        out = engine.data_parallel(step, torch.device(device, 0) if device == "cuda" else torch.device(device),
                                   world=2, sync_batchnorm=sync)
        image_kinds = {type(m) for m in out["image"].modules()} & {torch.nn.BatchNorm1d, GlobalBatchNorm}
        assert image_kinds == {GlobalBatchNorm if synced else torch.nn.BatchNorm1d}
        assert type(out["text"][0]) is torch.nn.BatchNorm1d  # never the text side
        assert engine.data_parallel(step, torch.device("cpu"), world=1, sync_batchnorm=sync) is step
    assert wrapped == [False, True]
