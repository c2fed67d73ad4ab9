"""scripts/study.py: runs configs x seeds (really, through train.py), skips finished runs, and tabulates
mean ± std from the runs' eval json."""
import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import study  # noqa: E402


def write_study(path: Path, data_root: Path, bert: str) -> Path:
    common = [f"data.root={data_root}", f"model.text_encoder={bert}", "model.region_dim=16",
              "model.embed_dim=16", "train.batch_size=8", "train.epochs=1", "train.max_steps_per_epoch=2",
              "train.device=cpu", "eval.batch_size=20"]
    path.write_text(json.dumps({"seeds": [0, 1], "runs": [
        {"name": "triplet", "label": "triplet baseline", "config": "configs/baselines/f30k_vse.yaml",
         "set": common},
        {"name": "dcl", "config": "configs/ablations/table2_row2_dcl.yaml",
         "set": common + ["loss.dcl_positive=unscaled"]},
    ]}))
    return path


def test_study_runs_every_seed_and_tabulates(tiny_coder_data, tiny_bert_dir, tmp_path, capsys):
    spec = write_study(tmp_path / "tiny_study.yaml", tiny_coder_data, tiny_bert_dir)
    readme = tmp_path / "README.md"
    start, end = study.markers("tiny_study")
    readme.write_text(f"intro\n{start}\nold\n{end}\nrest\n")
    out = tmp_path / "runs"
    assert study.main([str(spec), "--out", str(out), "--readme", str(readme), "--log", str(tmp_path / "log")]) == 0
    results = {name: [json.loads((out / name / f"seed{s}" / "eval_test.json").read_text()) for s in (0, 1)]
               for name in ("triplet", "dcl")}
    for name, runs in results.items():
        stored = [yaml.safe_load((out / name / f"seed{s}" / "config.yaml").read_text())["train"]["seed"]
                  for s in (0, 1)]
        assert stored == [0, 1], f"{name}: seeds were not passed to train.py"
    table = capsys.readouterr().out
    rsums = [r["rsum"] for r in results["triplet"]]
    expected = f"{statistics.mean(rsums):.1f} ± {statistics.stdev(rsums):.1f}"
    line = next(row for row in table.splitlines() if row.startswith("| triplet baseline |"))
    assert f"| {expected} |" in line and line.split("|")[2].strip() == "2"
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text and "triplet baseline" in text

    # a second invocation trains nothing: finished runs are kept as they are
    stamp = (out / "dcl" / "seed1" / "eval_test.json").stat().st_mtime_ns
    assert study.main([str(spec), "--out", str(out)]) == 0
    assert (out / "dcl" / "seed1" / "eval_test.json").stat().st_mtime_ns == stamp


def test_study_file_errors_name_the_entry(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"runs": [{"name": "a", "config": "x.yaml"}, {"name": "a", "config": "y.yaml"}]}))
    with pytest.raises(study.StudyError, match="'a' appears twice"):
        study.load_study(bad)
    bad.write_text(json.dumps({"runs": [{"name": "a"}]}))
    with pytest.raises(study.StudyError, match=r"runs\[0\] needs a string 'config'"):
        study.load_study(bad)
