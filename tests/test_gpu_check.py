"""benchmarks/gpu_check.py --dry-run: every stage of the GPU acceptance run on the CPU at tiny sizes, with the
JSON keys of the GPU run, and the stop-and-resume stage gives the uninterrupted run's metrics; it fails (exit 1)
when a target fails, e.g. a sync planted in the training step."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

STAGES = gpu_check.STAGES
# about 30 s on two idle CPU cores (every stage at tiny sizes)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    assert gpu_check.main(["--dry-run", "--out", str(out / "gpu_check.json"), "--work", str(out / "work")]) == 0
    return json.loads((out / "gpu_check.json").read_text())


def test_dry_run_writes_every_stage(report):
    assert report["dry_run"] is True
    assert set(STAGES) <= set(report) and set(report["seconds"]) == set(STAGES)
    assert {name: [r["method"] for r in rows] for name, rows in report["train_step"].items()} == \
        {"bf16": gpu_check.METHODS, "fp32": gpu_check.METHODS}
    assert all(r["step_s"] > 0 for rows in report["train_step"].values() for r in rows)
    assert [(r["n"], r["k"]) for r in report["kmeans"]] == gpu_check.DRY["kmeans"]
    assert report["eval"]["captions"] == 5 * report["eval"]["images"]
    assert report["sync"]["steps"] == gpu_check.DRY["sync_steps"]
    assert report["sync"]["syncs_per_step"] == 0, report["sync"]["where"]  # as a CUDA run would count them
    assert all(r["loader_s"] > 0 for rows in report["train_step"].values() for r in rows)
    [row] = report["compile"]["rows"]  # the dry run's one comparison: the triplet step, dynamo's eager backend
    assert (row["method"], row["precision"], row["backend"]) == ("triplet", "fp32", "eager")
    assert row["frames_compiled"] > 0 and len(row["losses_compiled"]) == report["compile"]["steps"]
    assert row["max_rel_loss_diff"] == 0  # the eager backend runs eager's ops: the same losses to the bit
    assert report["failures"] == []


def test_stopped_and_resumed_demo_equals_the_uninterrupted_one(report):
    resume = report["resume"]
    assert resume["stopped_at"]["step_in_epoch"] > 0  # stopped mid-epoch, not at an epoch end
    assert resume["metrics_equal"] and resume["rsum_resumed"] == resume["rsum_uninterrupted"]


def test_a_sync_planted_in_the_step_fails_the_check(tmp_path, monkeypatch, capsys):
    from coder.step import ContrastiveStep

    forward = ContrastiveStep.forward

    def planted(self, *args):
        out = forward(self, *args)
        out[0].item()  # one wait for the device per step
        return out
    monkeypatch.setattr(ContrastiveStep, "forward", planted)
    out = tmp_path / "gpu_check.json"
    # the clean dry run above makes 0 syncs per step: a limit of 0 passes it and fails one planted sync
    code = gpu_check.main(["--dry-run", "--stages", "sync", "--max-syncs", "0", "--out", str(out),
                           "--work", str(tmp_path / "work")])
    report = json.loads(out.read_text())
    assert code == 1 and report["sync"]["syncs_per_step"] == 1
    [failure] = report["failures"]
    assert failure.startswith("sync: 1 host syncs per step") and "tests/test_gpu_check.py" in failure
    assert "FAILED sync" in capsys.readouterr().err


def test_compiled_losses_off_eagers_fail_the_check(report):
    """The dry run's eager / compiled comparison replayed with the last compiled loss 1% off (as dropout drawn
    from inductor's own generator is, tests/test_compile.py), with a NaN, and with nothing compiled: each fails."""
    row = report["compile"]["rows"][0]
    eager = {"method": row["method"], "step_s": row["eager_step_s"], "warmup_s": row["eager_warmup_s"],
             "losses": row["losses_eager"]}

    def replayed(factor, frames=row["frames_compiled"]):
        compiled = {**eager, "step_s": row["compiled_step_s"], "warmup_s": row["compiled_warmup_s"],
                    "losses": [*row["losses_compiled"][:-1], row["losses_compiled"][-1] * factor]}
        again = gpu_check.compare_losses(eager, compiled, row["precision"], row["backend"])
        return gpu_check.failures({"compile": {"rows": [{**again, "frames_compiled": frames}]}})

    assert replayed(1.0) == []
    for factor in (1.01, float("nan")):
        [failure] = replayed(factor)
        assert failure.startswith("compile fp32 triplet: the compiled (eager) losses differ from eager's by up to ")
    assert replayed(1.0, frames=0) == ["compile fp32 triplet: train.compile=eager compiled nothing"]
