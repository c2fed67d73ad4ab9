"""scripts/check_data.py (coder/data/verify.py): a good tree passes; each planted fault fails with one line
naming its file; features with no regions stop training with a one-line error instead of a traceback."""
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from coder.data import DataError, PrecompDataset, verify
from coder.demo import generate_demo_data

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_data", ROOT / "scripts" / "check_data.py")
check_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_data)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return generate_demo_data(tmp_path_factory.mktemp("check") / "demo", seed=0, train_images=10, dev_images=5,
                              test_images=5, region_dim=8)


@pytest.fixture
def tree(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "demo"))


def run(root: Path, capsys, *args: str) -> tuple[int, list[str]]:
    status = check_data.main([str(root), *args])
    out = capsys.readouterr().out
    return status, out.splitlines()


def errors(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("error: ")]


def rewrite_ims(root: Path, split: str, fn) -> None:
    path = root / f"{split}_ims.npy"
    array = fn(np.load(path))
    path.unlink()
    np.save(path, array)


def set_value(index, value):
    def fn(a):
        a[index] = value
        return a
    return fn


def test_demo_tree_passes(tree, capsys):
    status, lines = run(tree, capsys)
    assert status == 0, lines
    assert lines[-1].startswith("OK: the tree will train (train, dev, test)")
    assert not errors(lines) and len(lines) <= 24  # one screen
    assert run(tree, capsys, "--full")[0] == 0


def tiny_sizes(monkeypatch):
    """Known sizes of a 'data set' the size of the tiny tree, so the count check is exercised for real."""
    monkeypatch.setitem(verify.KNOWN, "f30k", {"name": "Tiny", "images": {"train": 10, "dev": 5, "test": 5},
                                                "required": ("train", "dev", "test")})


def plant_missing_split(root):
    (root / "test_ims.npy").unlink()
    return "test_ims.npy", "missing"


def plant_wrong_dtype(root):
    rewrite_ims(root, "train", lambda a: a.astype(np.float64))
    return "train_ims.npy", "float64"


def plant_count_off_by_one(root):  # one more image, consistent in every file, so only the count is wrong
    rewrite_ims(root, "train", lambda a: np.concatenate([a, a[:1]]))
    clip = np.load(root / "train_clip.npy")
    np.save(root / "train_clip.npy", np.concatenate([clip, clip[:1]]))
    with (root / "train_caps.txt").open("a") as f:
        f.write("".join(f"one more caption {k}\n" for k in range(5)))
    with (root / "train_ids.txt").open("a") as f:
        f.write("999999\n")
    return "train_ims.npy", "11 images"


def plant_nan_row(root):
    rewrite_ims(root, "train", set_value((7, 3, 2), np.nan))
    return "train_ims.npy", "row 7"


def plant_dropped_caption(root):  # every later caption now pairs with the wrong image
    lines = (root / "dev_caps.txt").read_text().splitlines(keepends=True)
    (root / "dev_caps.txt").write_text("".join(lines[:7] + lines[8:]))
    return "dev_caps.txt", "24 captions"


def plant_shifted_rows(root):  # one row per caption (F30K dev's layout), ids shifted by one line
    rewrite_ims(root, "dev", lambda a: np.repeat(a, 5, axis=0))
    np.save(root / "dev_clip.npy", np.repeat(np.load(root / "dev_clip.npy"), 5, axis=0))
    ids = (root / "dev_ids.txt").read_text().split()
    rows = [i for i in ids for _ in range(5)]
    (root / "dev_ids.txt").write_text("\n".join(rows[1:] + rows[:1]) + "\n")
    return "dev_ids.txt", "misaligned"


def plant_zero_regions(root):
    rewrite_ims(root, "train", lambda a: a[:, :0])
    return "train_ims.npy", "no region features"


def plant_leak(root):
    test_ids = (root / "test_ids.txt").read_text().split()
    train_ids = (root / "train_ids.txt").read_text().split()
    (root / "train_ids.txt").write_text("\n".join(train_ids[:-1] + test_ids[:1]) + "\n")
    return "test_ids.txt", "evaluation images in the training split"


FAULTS = [plant_missing_split, plant_wrong_dtype, plant_count_off_by_one, plant_nan_row, plant_dropped_caption,
          plant_shifted_rows, plant_zero_regions, plant_leak]


@pytest.mark.parametrize("plant", FAULTS, ids=[f.__name__.removeprefix("plant_") for f in FAULTS])
def test_planted_fault_fails_with_one_line_naming_the_file(plant, tree, capsys, monkeypatch):
    tiny_sizes(monkeypatch)
    name, words = plant(tree)
    status, lines = run(tree, capsys, "--dataset", "f30k")
    assert status == 1, lines
    found = errors(lines)
    assert len(found) == 1, found
    assert str(tree / name) in found[0] and words in found[0], found
    assert lines[-1].startswith("FAILED: 1 problem")


def test_known_sizes_of_the_real_sets():
    """CODER §4.1 / Karpathy's splits: a typo here would fail every real tree."""
    assert verify.KNOWN["f30k"]["images"] == {"train": 29_000, "dev": 1_014, "test": 1_000}
    assert verify.KNOWN["coco"]["images"] == {"train": 113_287, "dev": 5_000, "testall": 5_000}


def test_nan_found_by_sampling_evenly_spaced_rows(tree, capsys):
    """--sample 2 reads the first and the last row only: an inf in the last row is found, a NaN in the middle
    only by --full (the sampled check is a sample)."""
    rewrite_ims(tree, "test", set_value((-1, 0, 0), np.inf))
    status, lines = run(tree, capsys, "--sample", "2")
    assert status == 1 and "test_ims.npy: row 4 " in errors(lines)[0]
    rewrite_ims(tree, "test", set_value((-1, 0, 0), 0.0))
    rewrite_ims(tree, "train", set_value((4, 0, 0), np.nan))
    assert run(tree, capsys, "--sample", "2")[0] == 0
    status, lines = run(tree, capsys, "--full")
    assert status == 1 and "train_ims.npy: row 4 " in errors(lines)[0]


def test_zero_regions_stop_training_with_one_line(tree):
    """Before this check, region dropout drew from an empty range: 'ValueError: high <= 0' mid-epoch."""
    rewrite_ims(tree, "train", lambda a: a[:, :0])
    with pytest.raises(DataError, match=r"train_ims\.npy: shape \(10, 0, 8\) holds no region features"):
        dataset = PrecompDataset(tree, "train", None, train=True, region_dropout=0.2, word_corruption=0.0)
        dataset[0]


def test_ids_unique_per_caption_row_are_not_checked_for_alignment(tree, capsys):
    """A per-caption-row file whose ids label rows (all distinct) passes; only repeated ids are image ids."""
    rewrite_ims(tree, "dev", lambda a: np.repeat(a, 5, axis=0))
    np.save(tree / "dev_clip.npy", np.repeat(np.load(tree / "dev_clip.npy"), 5, axis=0))
    (tree / "dev_ids.txt").write_text("".join(f"row{r}\n" for r in range(25)))
    status, lines = run(tree, capsys)
    assert status == 0, lines
    assert "one row per caption" in next(line for line in lines if line.startswith("dev "))


def test_all_zero_row_is_a_warning_naming_the_file(tree, capsys):
    """A detector or converter that left an image empty: the tree still trains, the report says where."""
    rewrite_ims(tree, "test", set_value(3, 0.0))
    status, lines = run(tree, capsys)
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert status == 0 and len(warnings) == 1, lines
    assert f"{tree / 'test_ims.npy'}: 1 sampled row(s) are all zero (first: row 3)" in warnings[0]
