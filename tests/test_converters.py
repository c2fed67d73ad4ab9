"""scripts/convert_butd_tsv.py and scripts/extract_grid_features.py on inputs the tests make: a synthetic detector
TSV with Karpathy split files, and generated images with a random-init ResNet. Each output passes
scripts/check_data.py's checks and trains a step; both resume after a crash to the same bytes."""
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import coder.data.butd as butd
import coder.data.grid as grid
from coder.config import load_config
from coder.data import DataError
from coder.data.resnet import build_resnet, load_weights
from coder.data.verify import verify_tree
from coder.engine import Trainer

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- inputs

COCO_SPLITS = ["train"] * 10 + ["restval"] * 2 + ["val"] * 3 + ["test"] * 3


def coco_karpathy(path: Path) -> Path:
    """COCO-style entries (cocoid, filepath); some images have 6 sentences (the first 5 are kept)."""
    images = [{"split": split, "cocoid": 500 + i, "imgid": i, "filepath": "val2014", "filename": f"COCO_{i}.jpg",
               "sentences": [{"raw": f"A dog number {i}\nsits {k}  here. "} for k in range(5 + i % 2)]}
              for i, split in enumerate(COCO_SPLITS)]
    path.write_text(json.dumps({"images": images}))
    return path


def features_of(image_id: int) -> np.ndarray:
    return np.random.default_rng(image_id).random((36, 8), dtype=np.float32) - 0.5


def write_tsv(path: Path, ids, edit=None) -> Path:
    """One row per id (shuffled order plus ids not in the split file); `edit(i, line)` may corrupt a line."""
    with path.open("wb") as f:
        for i, image_id in enumerate(ids):
            line = butd.encode_row(image_id, 640, 480, np.random.default_rng(i).random((36, 4)), features_of(image_id))
            f.write(edit(i, line) if edit else line)
    return path


def tsv_ids() -> list[int]:
    ids = [500 + i for i in range(len(COCO_SPLITS))] + [9001, 9002]  # two rows of images not in any split
    return list(np.random.default_rng(0).permutation(ids))


@pytest.fixture
def tsv_inputs(tmp_path):
    return write_tsv(tmp_path / "feats.tsv", tsv_ids()), coco_karpathy(tmp_path / "dataset_coco.json")


def train_one_step(root: Path, bert: str, run: Path, region_dim: int, test_split: str) -> None:
    cfg = load_config(ROOT / "configs/baselines/f30k_vse.yaml", [
        f"data.root={root}", f"data.test_split={test_split}", "data.num_workers=0", f"model.text_encoder={bert}",
        f"model.region_dim={region_dim}", "model.embed_dim=32", "train.batch_size=8", "train.max_steps_per_epoch=1",
        "train.epochs=1", "train.device=cpu", "eval.batch_size=20"])
    trainer = Trainer(cfg, run, progress=False)
    try:
        before = {n: p.detach().clone() for n, p in trainer.step_module.named_parameters() if p.requires_grad}
        trainer.train_epoch(0)
        after = dict(trainer.step_module.named_parameters())
        moved = [n for n, old in before.items() if not torch.equal(after[n].detach(), old)]
        assert moved, "the step updated no parameter"
        assert all(torch.isfinite(after[n]).all() for n in moved)
    finally:
        trainer.log.close()


# ---------------------------------------------------------------- BUTD TSV

def test_tsv_to_precomp_checks_and_trains(tsv_inputs, tmp_path, tiny_bert_dir, capsys):
    tsv, karpathy = tsv_inputs
    out = tmp_path / "coco_precomp"
    status = load_script("convert_butd_tsv").main(["--tsv", str(tsv), "--karpathy", str(karpathy), "--out", str(out),
                                                   "--dim", "8", "--checkpoint-rows", "3", "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "2 TSV rows not in" in printed and "OK: the tree will train (train, dev, testall)" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}_{k}" for s in ("train", "dev", "testall")
                                                           for k in ("ims.npy", "caps.txt", "ids.txt"))
    ids = (out / "train_ids.txt").read_text().split()
    assert ids == [str(500 + i) for i in range(12)]  # Karpathy's order, restval inside train
    train = np.load(out / "train_ims.npy")
    assert train.shape == (12, 36, 8) and train.dtype == np.float32
    for row, image_id in enumerate(ids):  # each row holds its own image's features, whatever the TSV order
        np.testing.assert_array_equal(train[row], features_of(int(image_id)))
    caps = (out / "testall_caps.txt").read_text().splitlines()
    assert len(caps) == 15 and caps[0] == "A dog number 15 sits 0 here." and caps[4].endswith("sits 4 here.")
    assert verify_tree(out, "any", ("train", "dev", "testall")).ok
    train_one_step(out, tiny_bert_dir, tmp_path / "run", region_dim=8, test_split="testall")


def convert(tsv, karpathy, out, **kw):
    return butd.convert_butd_tsv([tsv], karpathy, out, dim=8, progress=False, **kw)


def test_tsv_resumes_after_a_crash_to_the_same_bytes(tsv_inputs, tmp_path, monkeypatch):
    tsv, karpathy = tsv_inputs
    convert(tsv, karpathy, tmp_path / "whole")
    calls, parse = [], butd.parse_row

    def crash_on_the_ninth_row(*args):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return parse(*args)

    monkeypatch.setattr(butd, "parse_row", crash_on_the_ninth_row)
    with pytest.raises(KeyboardInterrupt):
        convert(tsv, karpathy, tmp_path / "resumed", checkpoint_rows=3)
    assert not (tmp_path / "resumed" / "train_ims.npy").exists()  # a partial tree never looks finished
    monkeypatch.setattr(butd, "parse_row", parse)
    stats = convert(tsv, karpathy, tmp_path / "resumed", checkpoint_rows=3)
    assert 0 < stats["rows"] < len(COCO_SPLITS)  # the rows before the last checkpoint were not redone
    for name in ("train_ims.npy", "dev_ims.npy", "testall_ims.npy", "train_caps.txt", "testall_ids.txt"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not list((tmp_path / "resumed").glob(".*")) and not list((tmp_path / "resumed").glob("*.partial"))


def corrupt(index: int, fn):
    return lambda i, line: fn(line) if i == index else line


BAD_ROWS = {
    "box_count": (corrupt(3, lambda line: line.replace(b"\t36\t", b"\t35\t", 1)), "35 boxes, expected 36"),
    "fields": (corrupt(3, lambda line: line.replace(b"\t", b" ", 1)), "5 tab-separated fields"),
    "truncated": (corrupt(3, lambda line: line[:-101] + b"\n"), "features"),
    "nan": (None, "hold non-finite values"),
    "duplicate": (None, "has a second row"),
    "missing": (None, "have no features (first: id"),
}


@pytest.mark.parametrize("fault", sorted(BAD_ROWS))
def test_tsv_bad_row_is_one_line_naming_file_and_line(fault, tmp_path, capsys):
    edit, words = BAD_ROWS[fault]
    ids = tsv_ids()
    if fault == "duplicate":
        ids = ids + [ids[2]]
    if fault == "missing":
        ids = [i for i in ids if i != 507]
    if fault == "nan":
        def edit(i, line):
            if i != 3:
                return line
            bad = features_of(ids[3])
            bad[5, 1] = np.nan
            return butd.encode_row(ids[3], 640, 480, np.zeros((36, 4)), bad)
    tsv = write_tsv(tmp_path / "feats.tsv", ids, edit)
    karpathy = coco_karpathy(tmp_path / "k.json")
    status = load_script("convert_butd_tsv").main(["--tsv", str(tsv), "--karpathy", str(karpathy), "--out",
                                                   str(tmp_path / "out"), "--dim", "8", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {tsv}") and words in err[0], err
    if fault not in ("missing", "duplicate"):
        assert re.search(rf"{re.escape(str(tsv))}:4\b", err[0])  # the line of the bad row


def test_karpathy_file_problems_name_the_entry(tmp_path):
    from coder.data.karpathy import read_karpathy

    path = coco_karpathy(tmp_path / "k.json")
    data = json.loads(path.read_text())
    data["images"][4]["sentences"] = data["images"][4]["sentences"][:3]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[4\] \(id 504\): 3 non-empty 'raw' sentences"):
        read_karpathy(path)
    data["images"][4]["cocoid"] = 503
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[4\]: id 503 .* also at images\[3\]"):
        read_karpathy(path)


# ---------------------------------------------------------------- raw images -> grid features

F30K_SPLITS = ["train"] * 6 + ["val"] * 2 + ["test"] * 2


@pytest.fixture
def image_inputs(tmp_path):
    """Generated images of varied sizes (and one greyscale) and a Flickr30K-style split file."""
    folder = tmp_path / "flickr30k-images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i, split in enumerate(F30K_SPLITS):
        pixels = rng.integers(0, 256, (37 + 9 * i, 50 + 5 * i, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert("L" if i == 3 else "RGB")
        image.save(folder / f"{1000 + i}.{'png' if i % 2 else 'jpg'}")
        images.append({"split": split, "imgid": i, "filename": f"{1000 + i}.{'png' if i % 2 else 'jpg'}",
                       "sentences": [{"raw": f"picture {i} shows thing {k}"} for k in range(5)]})
    karpathy = tmp_path / "dataset_flickr30k.json"
    karpathy.write_text(json.dumps({"images": images}))
    return folder, karpathy


def extract(folder, karpathy, out, **kw):
    options = dict(weights=None, arch="resnet50", size=64, batch_size=3, num_workers=0, device="cpu", progress=False)
    return grid.extract_grid_features(folder, karpathy, out, **{**options, **kw})


def test_grid_features_check_and_train(image_inputs, tmp_path, tiny_bert_dir, capsys):
    folder, karpathy = image_inputs
    out = tmp_path / "f30k_grid"
    status = load_script("extract_grid_features").main([
        "--images", str(folder), "--karpathy", str(karpathy), "--out", str(out), "--random-init", "--arch",
        "resnet50", "--size", "64", "--batch-size", "4", "--num-workers", "1", "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "OK: the tree will train (train, dev, test)" in printed
    train = np.load(out / "train_ims.npy")
    assert train.shape == (6, 4, 2048) and train.dtype == np.float32  # 64 px -> a 2 x 2 grid of layer4
    assert (out / "train_ids.txt").read_text().split() == [str(1000 + i) for i in range(6)]
    torch.manual_seed(0)  # the same random init: row 3 (the greyscale PNG) is its own image's layer4 map
    model = build_resnet("resnet50").eval()
    with torch.inference_mode():
        expected = model.grid(grid.load_pixels(folder / "1003.png", 64)[None])[0].flatten(1).T.numpy()
    np.testing.assert_allclose(train[3], expected, rtol=1e-3, atol=1e-3)  # batch composition changes float sums
    train_one_step(out, tiny_bert_dir, tmp_path / "run", region_dim=2048, test_split="test")


def test_grid_resumes_after_a_crash(image_inputs, tmp_path, monkeypatch):
    folder, karpathy = image_inputs
    extract(folder, karpathy, tmp_path / "whole")
    calls, load = [], grid.load_pixels

    def crash_on_the_eighth_image(*args):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return load(*args)

    monkeypatch.setattr(grid, "load_pixels", crash_on_the_eighth_image)
    with pytest.raises(KeyboardInterrupt):
        extract(folder, karpathy, tmp_path / "resumed")
    monkeypatch.setattr(grid, "load_pixels", load)
    assert extract(folder, karpathy, tmp_path / "resumed")["rows"] == 4  # two batches of 3 were kept
    for split in ("train", "dev", "test"):
        np.testing.assert_allclose(np.load(tmp_path / "resumed" / f"{split}_ims.npy"),
                                   np.load(tmp_path / "whole" / f"{split}_ims.npy"), rtol=1e-3, atol=1e-3)
    # a partial run with other settings is refused, not mixed in
    calls.clear()
    monkeypatch.setattr(grid, "load_pixels", crash_on_the_eighth_image)
    with pytest.raises(KeyboardInterrupt):
        extract(folder, karpathy, tmp_path / "other")
    monkeypatch.setattr(grid, "load_pixels", load)
    with pytest.raises(DataError, match=r"\.grid_progress\.json: an unfinished conversion .*differs in shapes, size"):
        extract(folder, karpathy, tmp_path / "other", size=96)


def test_resnet_is_torchvision_layout(tmp_path):
    """Parameter counts of torchvision's ResNet-50/101/152 (its model docs: 25,557,032 / 44,549,160 /
    60,192,808); a state dict saved from one loads into another strictly, one of another depth is refused."""
    counts = {"resnet50": 25_557_032, "resnet101": 44_549_160, "resnet152": 60_192_808}
    for arch, count in counts.items():
        assert sum(p.numel() for p in build_resnet(arch).parameters()) == count, arch
    torch.manual_seed(1)
    source = build_resnet("resnet50")
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # a DataParallel-style prefix
    torch.save({"state_dict": state}, tmp_path / "r50.pth")
    target = build_resnet("resnet50")
    load_weights(target, tmp_path / "r50.pth")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    assert tuple(source.state_dict()["layer4.2.conv3.weight"].shape) == (2048, 512, 1, 1)
    assert "layer1.0.downsample.1.running_mean" in source.state_dict()
    with pytest.raises(DataError, match=r"r50\.pth: not a torchvision-layout ResNet of this depth"):
        load_weights(build_resnet("resnet101"), tmp_path / "r50.pth")


def test_missing_image_is_one_line(image_inputs, tmp_path, capsys):
    folder, karpathy = image_inputs
    (folder / "1007.png").unlink()
    status = load_script("extract_grid_features").main([
        "--images", str(folder), "--karpathy", str(karpathy), "--out", str(tmp_path / "out"), "--random-init",
        "--arch", "resnet50", "--size", "64", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "1007.png: image of id 1007 (dev) not found" in err[0], err
