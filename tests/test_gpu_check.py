"""benchmarks/gpu_check.py --dry-run: every stage of the GPU acceptance run on the CPU at tiny sizes, with the
JSON keys of the GPU run, and the stop-and-resume stage gives the uninterrupted run's metrics."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

STAGES = ["resume", "sync", "train_step", "kmeans", "eval"]
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
    assert report["sync"]["steps"] == gpu_check.DRY["sync_steps"] and report["sync"]["syncs"] >= 0  # 0: sync-free


def test_stopped_and_resumed_demo_equals_the_uninterrupted_one(report):
    resume = report["resume"]
    assert resume["stopped_at"]["step_in_epoch"] > 0  # stopped mid-epoch, not at an epoch end
    assert resume["metrics_equal"] and resume["rsum_resumed"] == resume["rsum_uninterrupted"]
