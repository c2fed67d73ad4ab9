"""DDP training end to end on CPU (CODER §3.2 banks, §3.4 k-means): `torch.distributed.run --nproc_per_node=2 train.py`
with gloo, full CODER (concept branch + PGC k-means, momentum encoders and banks) on tiny data.

The three runs (2 processes, 1 process under the launcher, plain `python train.py`) start together, as
separate processes, and the tests check their outputs. The 2-process run goes through a small wrapper
that calls `train.main` after making `Trainer.train_epoch` dump each rank's state, so the tests can
check that the ranks agree (parameters, momentum encoders, banks, k-means labels).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BATCH, STEPS, EPOCHS, QUEUE = 4, 3, 2, 20  # 2 ranks x 4 keys per step: 8 does not divide 20 (wrap)
TIMEOUT_S = 240  # a deadlock fails the test instead of hanging it

WRAPPER = """
import sys
from pathlib import Path

import torch

sys.path.insert(0, {repo!r})
import coder.engine as engine  # noqa: E402
import train  # noqa: E402

train_epoch = engine.Trainer.train_epoch


def train_epoch_and_dump(self, epoch):
    train_epoch(self, epoch)
    state = {{"model": self.step.state_dict(), "labels": self.labels, "centroids": self.centroids}}
    torch.save(state, Path({out!r}) / f"rank{{self.rank}}_epoch{{epoch}}.pth")


engine.Trainer.train_epoch = train_epoch_and_dump
sys.exit(train.main(sys.argv[1:]))
"""


def write_config(path: Path, root: Path, bert_dir: str) -> Path:
    path.write_text(textwrap.dedent(f"""
        data: {{root: {root}, }}
        model:
          text_encoder: {bert_dir}
          region_dim: 16
          embed_dim: 32
          concept: {{enabled: true, vocab: {root / 'concepts.npz'}, gcn_hidden: 16}}
          momentum: {{enabled: true, queue_size: {QUEUE}}}
        cluster: {{k: 8, iters: 3, start_epoch: 1}}
        train: {{epochs: {EPOCHS}, batch_size: {BATCH}, max_steps_per_epoch: {STEPS}, device: cpu,
                 log_every: 1, save_every: 0}}
        eval: {{batch_size: 16}}
        """))
    return path


def start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # own process group: a timeout kills the launcher's children


def finish(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"{proc.args} did not finish in {TIMEOUT_S} s (deadlock?); log:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir, tiny_coder_data):
    """Output folders of the three runs, after checking that each exited with 0."""
    tmp = tmp_path_factory.mktemp("ddp")
    root = tiny_coder_data
    config = write_config(tmp / "tiny_ddp.yaml", root, tiny_bert_dir)
    dumps = tmp / "dumps"
    dumps.mkdir()
    wrapper = tmp / "train_and_dump.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO), out=str(dumps)))
    common = ["--config", str(config), "--no-progress"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    commands = {
        "ddp2": launcher + ["--nproc_per_node=2", str(wrapper)] + common + ["--output", str(tmp / "ddp2")],
        "ddp1": launcher + ["--nproc_per_node=1", "train.py"] + common + ["--output", str(tmp / "ddp1")],
        "plain": [sys.executable, "train.py"] + common + ["--output", str(tmp / "plain")],
    }
    procs = {name: start(argv, tmp / f"{name}.log") for name, argv in commands.items()}
    for name, proc in procs.items():
        code = finish(proc, tmp / f"{name}.log")
        assert code == 0, f"{name} exited with {code}:\n{(tmp / f'{name}.log').read_text()[-3000:]}"
    return {"dir": tmp, "dumps": dumps, **{name: tmp / name for name in commands}}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_rank0_writes_every_output(runs):
    names = {p.name for p in runs["ddp2"].iterdir()}
    assert {"checkpoint_last.pth", "model_best.pth", "eval_test.json", "config.yaml"} <= names
    assert not [n for n in names if n.endswith(".tmp")], names
    result = json.loads((runs["ddp2"] / "eval_test.json").read_text())
    assert set(result) >= {"i2t", "t2i", "rsum", "instance", "concept"}
    ckpt = load(runs["ddp2"] / "checkpoint_last.pth")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (EPOCHS, 0, EPOCHS * STEPS)


def test_ranks_hold_identical_models_banks_and_labels(runs):
    """Parameters, momentum encoders, banks and k-means labels agree on both ranks after every epoch.

    BatchNorm running statistics are the exception, by DDP's design: each rank updates its own from its
    own batch, and DDP overwrites them with rank 0's at the next forward (only rank 0 saves and evaluates).
    """
    for epoch in range(EPOCHS):
        states = [load(runs["dumps"] / f"rank{r}_epoch{epoch}.pth") for r in range(2)]
        models = [s["model"] for s in states]
        assert models[0].keys() == models[1].keys()
        per_rank = ("running_mean", "running_var")
        differing = [k for k in models[0] if not torch.equal(models[0][k], models[1][k])]
        assert all(k.endswith(per_rank) for k in differing), f"epoch {epoch}: ranks differ in {differing}"
        if epoch >= 1:  # PGC active: one k-means on rank 0, broadcast
            assert torch.equal(states[0]["labels"], states[1]["labels"])
            assert torch.equal(states[0]["centroids"], states[1]["centroids"])
            assert states[0]["labels"].numel() == 16 * 5


def test_banks_enqueue_the_keys_of_both_ranks(runs):
    """Every step writes 2 ranks x batch keys (all-gathered); the pointer wraps around the queue size."""
    momentum = load(runs["ddp2"] / "checkpoint_last.pth")["momentum"]
    written = EPOCHS * STEPS * 2 * BATCH
    for bank in ("queue_v", "queue_w"):
        assert int(momentum[f"{bank}.ptr"]) == written % QUEUE
        assert int(momentum[f"{bank}.filled"]) == min(written, QUEUE)
        ids = momentum[f"{bank}.ids"]
        assert ((ids >= 0) & (ids < 16)).all(), ids  # every slot holds a real training image id
    # one process under the launcher enqueues half as many keys
    single = load(runs["ddp1"] / "checkpoint_last.pth")["momentum"]
    assert int(single["queue_v.ptr"]) == (EPOCHS * STEPS * BATCH) % QUEUE


def test_one_process_launcher_matches_plain_python(runs):
    """`torch.distributed.run --nproc_per_node=1` and `python train.py` give the same numbers (CPU, seeded)."""
    results = [json.loads((runs[name] / "eval_test.json").read_text()) for name in ("ddp1", "plain")]
    for result in results:
        result.pop("timing")
        for branch in ("instance", "concept"):
            result[branch].pop("timing", None)
    assert results[0] == results[1]
    a, b = (load(runs[name] / "checkpoint_last.pth")["model"] for name in ("ddp1", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)
