"""scripts/extract_clip_features.py on a tiny random CLIP and generated PNG images (USER's CGE)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("extract_clip_features", ROOT / "scripts" / "extract_clip_features.py")
ecf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ecf)

IDS = ["img5", "img2", "img0", "img4", "img1", "img3"]  # S_ids.txt order differs from the mapping order


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=512)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip(clip_dir):
    return ecf.load_clip(clip_dir)


@pytest.fixture
def split(tmp_path):
    """Six generated images (varied sizes/colours) under images/, a TSV mapping and test_ids.txt."""
    rng = np.random.default_rng(0)
    (tmp_path / "images" / "sub").mkdir(parents=True)
    lines = []
    for i in range(6):
        pixels = rng.integers(0, 256, size=(24 + 4 * i, 40 - 2 * i, 3), dtype=np.uint8)
        rel = f"sub/{i}.png"
        Image.fromarray(pixels).save(tmp_path / "images" / rel)
        lines.append(f"img{i}\t{rel}")
    (tmp_path / "map.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "test_ids.txt").write_text("\n".join(IDS) + "\n")
    return tmp_path


def reference_features(clip, root):
    """Each image encoded alone, in S_ids order (independent of batching)."""
    model, processor = clip
    rows = [ecf.encode_images(model, processor, [Image.open(root / "images" / f"sub/{i[3:]}.png").convert("RGB")])
            for i in IDS]
    return np.concatenate(rows)


def test_output_is_aligned_with_ids_order(clip, split):
    out = ecf.extract_split(*clip, split / "test_ids.txt", split / "map.tsv", split / "images",
                            batch_size=4, num_workers=2)
    assert out == split / "test_clip.npy"
    features = np.load(out)
    assert features.shape == (6, 512) and features.dtype == np.float32
    np.testing.assert_allclose(features, reference_features(clip, split), rtol=1e-4, atol=1e-5)
    assert len({row.tobytes() for row in features}) == 6
    assert not (split / "test_clip.npy.partial").exists()
    assert not (split / "test_clip.npy.progress.json").exists()


def test_json_mapping_and_entry_point(clip_dir, split):
    mapping = dict(line.split("\t") for line in (split / "map.tsv").read_text().splitlines())
    (split / "map.json").write_text(json.dumps(mapping))
    ecf.main(["--model-dir", str(clip_dir), "--mapping", str(split / "map.json"), "--image-root",
              str(split / "images"), "--data-root", str(split), "--splits", "test", "--batch-size", "5",
              "--device", "cpu", "--num-workers", "0"])
    tsv = ecf.extract_clip_features(clip_dir, split / "test_ids.txt", split / "map.tsv", split / "images",
                                    split / "again.npy", batch_size=3)
    np.testing.assert_allclose(np.load(split / "test_clip.npy"), np.load(tsv), rtol=1e-5, atol=1e-6)


def test_resume_after_interruption_gives_identical_output(clip, split, monkeypatch):
    full = np.load(ecf.extract_split(*clip, split / "test_ids.txt", split / "map.tsv", split / "images",
                                     split / "full.npy", batch_size=2, num_workers=0))

    real_load = ecf.load_image
    loaded = []

    def crash_in_second_batch(path, image_id):
        if len(loaded) == 3:
            raise KeyboardInterrupt  # killed while reading the second batch
        loaded.append(image_id)
        return real_load(path, image_id)

    monkeypatch.setattr(ecf, "load_image", crash_in_second_batch)
    out = split / "resumed.npy"
    with pytest.raises(KeyboardInterrupt):
        ecf.extract_split(*clip, split / "test_ids.txt", split / "map.tsv", split / "images", out,
                          batch_size=2, num_workers=0)
    assert not out.exists()
    assert json.loads((split / "resumed.npy.progress.json").read_text())["done"] == 2

    monkeypatch.setattr(ecf, "load_image", lambda path, image_id: loaded.append(image_id) or real_load(path, image_id))
    loaded.clear()
    ecf.extract_split(*clip, split / "test_ids.txt", split / "map.tsv", split / "images", out,
                      batch_size=3, num_workers=0)  # a different batch size is fine
    assert loaded == IDS[2:]  # only the unfinished rows were encoded again
    np.testing.assert_allclose(np.load(out), full, rtol=1e-5, atol=1e-6)
    assert not (split / "resumed.npy.partial").exists()


def test_error_cases(clip, split, tmp_path_factory):
    model, processor = clip
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-base-patch32"):
        ecf.load_clip(tmp_path_factory.mktemp("empty") / "clip-vit-base-patch32")

    (split / "bad_ids.txt").write_text("img1\nimg9\n")
    with pytest.raises(ecf.ClipInputError, match=r"bad_ids.txt:2: image id 'img9' is missing from .*map.tsv"):
        ecf.extract_split(model, processor, split / "bad_ids.txt", split / "map.tsv", split / "images")

    (split / "images" / "sub" / "3.png").write_bytes(b"not a png at all")
    with pytest.raises(ecf.ClipInputError, match=r"cannot read image for id 'img3': .*3.png"):
        ecf.extract_split(model, processor, split / "test_ids.txt", split / "map.tsv", split / "images")

    (split / "images" / "sub" / "3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"'img3' \(.*test_ids.txt:6\) not found"):
        ecf.extract_split(model, processor, split / "test_ids.txt", split / "map.tsv", split / "images")

    (split / "broken.tsv").write_text("img0 sub/0.png\n")
    with pytest.raises(ecf.ClipInputError, match=r"broken.tsv:1: expected 'id<TAB>relative/path'"):
        ecf.read_mapping(split / "broken.tsv")


def test_command_line_errors_are_one_line(clip_dir, split, capsys):
    """A missing mapping file, broken JSON or a missing CLIP folder: exit 2 with one `error:` line, no traceback."""
    (split / "broken.json").write_text("{not json")
    common = ["--image-root", str(split / "images"), "--data-root", str(split), "--splits", "test", "--device", "cpu"]
    cases = [(["--model-dir", str(clip_dir), "--mapping", str(split / "absent.tsv")], "image mapping file not found"),
             (["--model-dir", str(clip_dir), "--mapping", str(split / "broken.json")], "broken.json: not valid JSON"),
             (["--model-dir", str(split / "no_clip"), "--mapping", str(split / "map.tsv")], "no CLIP model found")]
    for argv, message in cases:
        assert ecf.main(argv + common) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
