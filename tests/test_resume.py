"""Resume anywhere (docs/training.md: Resume): SIGKILL during a checkpoint write, in the middle of a training
step and during validation; `--resume auto` then ends with exactly the metrics and weights of an uninterrupted run.

Kills land at chosen moments through a small wrapper around `train.main` that, at the moment named by
the env var KILL_AT, writes a marker file and sleeps; the test then SIGKILLs the process. Nothing in
coder/ knows about it.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from coder.checkpoint import atomic_save, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS, EPOCHS, SAVE_EVERY = 4, 2, 3  # mid-epoch checkpoints at global steps 3 (epoch 0) and 6 (epoch 1)
TIMEOUT_S = 180

WRAPPER = """
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, {repo!r})
import coder.engine as engine  # noqa: E402
from coder.step import Objective  # noqa: E402
import train  # noqa: E402

KILL_AT, MARKER = os.environ["KILL_AT"], Path(os.environ["KILL_MARKER"])


def wait_for_kill():
    MARKER.write_text("ready")
    time.sleep(600)


saved_mid_epoch = []
atomic_save = engine.atomic_save


def atomic_save_and_note(state, path):
    atomic_save(state, path)
    if state.get("step_in_epoch", 0) > 0:
        saved_mid_epoch.append(state["global_step"])


forward = Objective.forward


def forward_or_block(self, *args, **kwargs):
    # killed inside the step after a mid-epoch checkpoint: the momentum encoders were already updated
    if KILL_AT == "mid_step" and saved_mid_epoch:
        wait_for_kill()
    return forward(self, *args, **kwargs)


validate = engine.Trainer.validate


def validate_or_block(self, epoch):
    if KILL_AT == "validation" and epoch == 1:
        wait_for_kill()
    return validate(self, epoch)


engine.atomic_save = atomic_save_and_note
Objective.forward = forward_or_block
engine.Trainer.validate = validate_or_block
sys.exit(train.main(sys.argv[1:]))
"""

SLOW_SAVER = """
import io
import sys
import time

import torch

sys.path.insert(0, {repo!r})
import coder.checkpoint as checkpoint  # noqa: E402

real_save = torch.save


def slow_save(obj, f):
    # the real bytes, but only half of them before the process stalls (and is killed)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    open({marker!r}, "w").write("writing")
    time.sleep(600)


checkpoint.torch.save = slow_save
checkpoint.atomic_save({{"format": "coder", "config": {{}}, "model": {{"w": torch.ones(1000, 1000)}}}}, {path!r})
"""


def env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def start(argv: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, env=env(**extra_env), stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_exit(proc: subprocess.Popen, log: Path) -> None:
    try:
        code = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{proc.args} did not finish in {TIMEOUT_S} s; log:\n{log.read_text()[-3000:]}")
    assert code == 0, f"{proc.args} exited with {code}:\n{log.read_text()[-3000:]}"


def kill_when_ready(proc: subprocess.Popen, marker: Path, log: Path) -> None:
    """SIGKILL the process once it wrote `marker` (it then sleeps at the chosen moment)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited ({proc.returncode}) before its kill point:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{proc.args} never reached its kill point; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    marker.unlink()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------- (a) atomic writes
def test_sigkill_during_checkpoint_write_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "checkpoint_last.pth"
    old = {"format": "coder", "config": {"train": {"lr": 1.0}}, "model": {"w": torch.arange(10.0)}}
    atomic_save(old, path)
    before = digest(path)
    marker = tmp_path / "writing"
    script = tmp_path / "slow_saver.py"
    script.write_text(SLOW_SAVER.format(repo=str(REPO), marker=str(marker), path=str(path)))
    proc = start([sys.executable, str(script)], tmp_path / "saver.log")
    kill_when_ready(proc, marker, tmp_path / "saver.log")

    assert digest(path) == before  # the final path was never touched
    assert torch.equal(load_checkpoint(path)["model"]["w"], old["model"]["w"])
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint_last.pth.")]
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the half-written temp file, left aside
    atomic_save(old, path)  # the next save still works with the stale temp file around
    assert digest(path) == before


# ------------------------------------------------------------------------------------- (b) training runs
def write_config(path: Path, root: Path, bert_dir: str) -> Path:
    path.write_text(textwrap.dedent(f"""
        data: {{root: {root}, }}
        model:
          text_encoder: {bert_dir}
          region_dim: 16
          embed_dim: 32
          concept: {{enabled: true, vocab: {root / 'concepts.npz'}, gcn_hidden: 16}}
          momentum: {{enabled: true, queue_size: 20}}
        cluster: {{k: 8, iters: 3, start_epoch: 1}}
        train: {{epochs: {EPOCHS}, batch_size: 4, max_steps_per_epoch: {STEPS}, device: cpu, deterministic: true,
                 log_every: 1, save_every: {SAVE_EVERY}}}
        eval: {{batch_size: 16}}
        """))
    return path


def comparable(result: dict) -> dict:
    """eval_test.json without the wall-clock timings."""
    result = dict(result)
    result.pop("timing")
    for branch in ("instance", "concept"):
        result[branch] = {k: v for k, v in result[branch].items() if k != "timing"}
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_dir, tiny_coder_data):
    """An uninterrupted run and a run killed twice (mid-step, then during validation), resumed to the end."""
    tmp = tmp_path_factory.mktemp("resume")
    root = tiny_coder_data
    config = write_config(tmp / "tiny_resume.yaml", root, tiny_bert_dir)
    wrapper = tmp / "train_until_killed.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO)))
    marker = tmp / "kill_point"
    common = ["--config", str(config), "--no-progress"]
    straight, killed = tmp / "straight", tmp / "killed"

    reference = start([sys.executable, "train.py", *common, "--output", str(straight)], tmp / "straight.log")
    states = {}
    for kill_at in ("mid_step", "validation"):  # both resumed from the previous kill's checkpoint
        log = tmp / f"{kill_at}.log"
        proc = start([sys.executable, str(wrapper), *common, "--output", str(killed), "--resume", "auto"], log,
                     KILL_AT=kill_at, KILL_MARKER=str(marker))
        kill_when_ready(proc, marker, log)
        states[kill_at] = load_checkpoint(killed / "checkpoint_last.pth")
    final = start([sys.executable, "train.py", *common, "--output", str(killed), "--resume", "auto"], tmp / "final.log")
    wait_exit(final, tmp / "final.log")
    wait_exit(reference, tmp / "straight.log")
    return {"straight": straight, "killed": killed, "states": states, "final_log": (tmp / "final.log").read_text()}


def test_kills_landed_after_mid_epoch_checkpoints(runs):
    mid_step, validation = runs["states"]["mid_step"], runs["states"]["validation"]
    assert (mid_step["epoch"], mid_step["step_in_epoch"], mid_step["global_step"]) == (0, SAVE_EVERY, SAVE_EVERY)
    assert (validation["epoch"], validation["step_in_epoch"]) == (1, 2 * SAVE_EVERY - STEPS)
    assert validation["kmeans"]["labels"] is not None  # the epoch-1 k-means labels travel with the checkpoint
    assert "resumed from" in runs["final_log"]


def test_resumed_run_ends_with_identical_metrics(runs):
    straight = json.loads((runs["straight"] / "eval_test.json").read_text())
    resumed = json.loads((runs["killed"] / "eval_test.json").read_text())
    assert comparable(resumed) == comparable(straight)


def test_resumed_run_ends_with_identical_weights_and_state(runs):
    a = load_checkpoint(runs["straight"] / "checkpoint_last.pth")
    b = load_checkpoint(runs["killed"] / "checkpoint_last.pth")
    for part in ("model", "objective"):
        differing = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not differing, f"{part}: {differing[:5]}"
    assert torch.equal(a["kmeans"]["labels"], b["kmeans"]["labels"])
    assert torch.equal(a["rng"]["ranks"][0]["torch"], b["rng"]["ranks"][0]["torch"])  # the one rank's CPU stream
    for key in ("epoch", "step_in_epoch", "global_step", "best_rsum", "best_epoch"):
        assert a[key] == b[key], key


def test_a_resume_carries_on_the_runs_training_time(runs):
    """Each checkpoint holds the training's wall time so far, and a resume continues that count rather than starting
    its own: the final count exceeds the last kill's checkpoint's, which exceeds the first's (a count restarted
    on resume would leave the final process's two steps below the second process's k-means, validation and three
    steps). train.log's last line and TensorBoard's `time/train_seconds` give the same count."""
    first, second = (runs["states"][kill]["train_seconds"] for kill in ("mid_step", "validation"))
    final = load_checkpoint(runs["killed"] / "checkpoint_last.pth")["train_seconds"]
    assert 0 < first < second < final
    events = EventAccumulator(str(runs["killed"]), size_guidance={"scalars": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("time/train_seconds")}
    assert sorted(logged) == list(range(EPOCHS)) and second < logged[EPOCHS - 1] <= final
    last_line = (runs["killed"] / "train.log").read_text().splitlines()[-1]
    assert float(last_line.split(", ")[-1].removesuffix(" s elapsed")) == pytest.approx(logged[EPOCHS - 1], abs=0.05)


def logged_steps(run: Path) -> dict[str, list[int]]:
    """Every scalar tag's steps as TensorBoard shows them (after the purges a resumed writer asked for)."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: sorted(e.step for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]}


def test_resumed_run_logs_the_steps_of_an_uninterrupted_run(runs):
    """Each resume purges from the first step its checkpoint does not hold: nothing is shown twice (the steps
    a killed run logged after its checkpoint) and nothing is lost (the checkpoint's own last step)."""
    straight, resumed = logged_steps(runs["straight"]), logged_steps(runs["killed"])
    assert straight["loss/total"] == list(range(1, EPOCHS * STEPS + 1))
    assert resumed == straight
