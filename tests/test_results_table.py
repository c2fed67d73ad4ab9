"""scripts/results_table.py builds the README table from eval json files."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import results_table  # noqa: E402


def fake_run(tmp_path, name, r1, concept=False):
    run = tmp_path / name
    run.mkdir()
    rec = {"r1": r1, "r5": r1 + 10, "r10": r1 + 20, "medr": 1.0, "meanr": 2.0}
    result = {"i2t": rec, "t2i": rec, "rsum": 2 * (3 * r1 + 30)}
    if concept:
        result["instance"] = dict(result)
        result["concept"] = dict(result)
    result.update({"dataset": "f30k", "split": "test", "best_epoch": 1})
    (run / "eval_test.json").write_text(json.dumps(result))
    (run / "config.yaml").write_text(f"name: {name}\ntrain:\n  lr: {0.001 if r1 >= 50 else 0.002}\n  epochs: 2\n")
    return run

def test_table_and_readme_block(tmp_path):
    a, b = fake_run(tmp_path, "demo", 50.0, concept=True), fake_run(tmp_path, "demo_user", 40.0)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results_table.START}\nold\n{results_table.END}\noutro\n")
    assert results_table.main([str(a), str(b), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("outro")
    assert "| `demo` | f30k test | 1 | 50.0 | 60.0 | 70.0 | 50.0 | 60.0 | 70.0 | 360.0 |  |" in text
    assert "`demo` concept-only" in text and "| `demo_user` | f30k test | 1 | 40.0" in text
    assert "Config keys that differ: `train.lr`: demo=0.001, demo_user=0.002" in text


def test_coco_runs_show_1k_and_5k(tmp_path):
    run = fake_run(tmp_path, "coco", 60.0)
    result = json.loads((run / "eval_test.json").read_text())
    result["5k"] = {**result, "rsum": 400.0}
    (run / "eval_test.json").write_text(json.dumps(result))
    assert "| 420.0 | 400.0 |" in results_table.table([run], "test")

def test_missing_eval_file_is_a_clear_error(tmp_path, capsys):
    assert results_table.main([str(tmp_path / "nope")]) == 2
    assert "eval_test.json not found" in capsys.readouterr().err
    readme = tmp_path / "R.md"
    readme.write_text("no markers")
    run = fake_run(tmp_path, "x", 1.0)
    assert results_table.main([str(run), "--readme", str(readme)]) == 2
