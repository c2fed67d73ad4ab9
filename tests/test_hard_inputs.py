"""Hard inputs: one test per row of the "Bad inputs" table (docs/bad-inputs.md), through the real command lines.

Each test makes one bad input, runs `train.main` / `evaluate.main` / `scripts/build_concepts.py` in this
process, and checks the exit status and that the message matches the row's "What you see" column (the
doc's `<...>` placeholders match anything). Then "nothing is lost": a non-finite loss or a failed save
leaves the previous checkpoints byte-for-byte intact.
"""
import errno
import hashlib
import importlib.util
import io
import json
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import train
from coder.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-inputs.md"
IMAGES, CAPTIONS_PER_IMAGE, REGION_DIM = 8, 5, 16
TESTED_ROWS: set[str] = set()


# ------------------------------------------------------------------------------------------ the table
def doc_rows() -> dict[str, str]:
    """Input column -> message (inside backticks) of every row of the table."""
    rows = {}
    section = ("\n" + DOC.read_text(encoding="utf-8")).split("\n# Bad inputs\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        match = re.fullmatch(r"\| (.+?) \| `(.+)` \|", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def row(name: str):
    """Mark a test as the check of the table row whose Input column starts with `name`."""
    TESTED_ROWS.add(name)
    return lambda test: test


def message_pattern(name: str) -> re.Pattern:
    matches = [msg for key, msg in doc_rows().items() if key.startswith(name)]
    assert len(matches) == 1, f"docs/bad-inputs.md: {len(matches)} rows start with {name!r}"
    parts = re.split(r"<[^<>]+>", matches[0])
    return re.compile(".+?".join(re.escape(p) for p in parts))


def assert_message(name: str, text: str) -> None:
    """Some line of `text` starts with the row's message (placeholders match anything)."""
    pattern = message_pattern(name)
    assert any(pattern.match(line) for line in text.splitlines()), \
        f"row {name!r}: expected a line matching {pattern.pattern!r}, got:\n{text}"


def test_every_row_of_the_table_has_a_test():
    assert set(doc_rows()) and {k for k in doc_rows() if not any(k.startswith(n) for n in TESTED_ROWS)} == set()
    assert all(sum(k.startswith(n) for k in doc_rows()) == 1 for n in TESTED_ROWS)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def clean_data(tmp_path_factory):
    from coder.demo import generate_demo_data

    return generate_demo_data(tmp_path_factory.mktemp("clean"), seed=0, train_images=IMAGES, dev_images=2,
                              test_images=2, region_dim=REGION_DIM)


@pytest.fixture
def data(tmp_path, clean_data) -> Path:
    """A private copy of the tiny demo data set, free to break."""
    return Path(shutil.copytree(clean_data, tmp_path / "data"))


def write_config(path: Path, root: Path, bert_dir: str, epochs: int = 1, steps: int = 2) -> Path:
    path.write_text(textwrap.dedent(f"""
        data: {{root: {root}, }}
        model: {{text_encoder: {bert_dir}, region_dim: {REGION_DIM}, embed_dim: 32}}
        train: {{epochs: {epochs}, batch_size: 4, max_steps_per_epoch: {steps}, device: cpu, log_every: 1,
                 save_every: 0}}
        eval: {{batch_size: 16}}
        """))
    return path


@pytest.fixture
def config(tmp_path, data, tiny_bert_dir) -> Path:
    return write_config(tmp_path / "tiny.yaml", data, tiny_bert_dir)


def run_train(capsys, *argv: str) -> tuple[int, str]:
    code = train.main([*argv, "--no-progress"])
    return code, capsys.readouterr().err


def train_fails(capsys, config: Path, tmp_path: Path, *overrides: str) -> str:
    args = [a for o in overrides for a in ("--set", o)]
    code, err = run_train(capsys, "--config", str(config), "--output", str(tmp_path / "run"), *args)
    assert code == 2, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, clean_data, tiny_bert_dir):
    """A finished tiny run: its config and output folder (checkpoint_last.pth, model_best.pth)."""
    tmp = tmp_path_factory.mktemp("trained")
    config = write_config(tmp / "tiny.yaml", clean_data, tiny_bert_dir)
    assert train.main(["--config", str(config), "--output", str(tmp / "run"), "--no-progress"]) == 0
    return config, tmp / "run"


def run_evaluate(capsys, checkpoint: Path, *argv: str) -> tuple[int, str]:
    code = evaluate.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress", *argv])
    return code, capsys.readouterr().err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ config
@row("Config file missing")
def test_config_file_missing(capsys, tmp_path):
    code, err = run_train(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert_message("Config file missing", err)


@row("Unknown config key")
def test_unknown_config_key(capsys, config, tmp_path):
    assert_message("Unknown config key", train_fails(capsys, config, tmp_path, "train.epoch=3"))
    config.write_text(config.read_text() + "trian: {epochs: 3}\n")  # in the YAML too
    assert "unknown config key 'trian'" in train_fails(capsys, config, tmp_path)


@row("Config value of the wrong type")
def test_config_value_of_wrong_type(capsys, config, tmp_path):
    assert_message("Config value of the wrong type", train_fails(capsys, config, tmp_path, "train.epochs=two"))


@row("Config value outside its choices")
def test_config_value_outside_choices(capsys, config, tmp_path):
    assert_message("Config value outside its choices", train_fails(capsys, config, tmp_path, "loss.instance=dlc"))


@row("Numeric config value outside its range")
def test_numeric_value_outside_its_range(capsys, config, tmp_path):
    assert_message("Numeric config value outside its range", train_fails(capsys, config, tmp_path, "train.lr=-0.1"))
    assert "must be positive, got -0.1" in train_fails(capsys, config, tmp_path, "train.lr=-0.1")
    assert "'model.momentum.m' must be in [0, 1), got 1.0" in train_fails(capsys, config, tmp_path,
                                                                       "model.momentum.m=1.0")
    # a decay factor of 0 would zero the learning rate at the first of train.lr_decay_epochs
    assert "'train.lr_decay' must be in (0, 1], got 0" in train_fails(capsys, config, tmp_path, "train.lr_decay=0")


@row("Config value that is NaN or inf")
def test_config_value_not_finite(capsys, config, tmp_path):
    assert_message("Config value that is NaN or inf", train_fails(capsys, config, tmp_path, "train.lr=.inf"))
    assert "'loss.mu' must be a finite number, got nan" in train_fails(capsys, config, tmp_path, "loss.mu=.nan")


@row("List config value with an element outside its range")
def test_list_value_element_outside_range(capsys, config, tmp_path):
    err = train_fails(capsys, config, tmp_path, "eval.beta_grid=[0.5, 1.5]")
    assert_message("List config value with an element outside its range", err)
    assert "must list non-negative integers, got [3, 'x']" in train_fails(capsys, config, tmp_path,
                                                                          "train.lr_decay_epochs=[3, x]")


@row("`data.val_max_captions` not a multiple")
def test_val_max_captions_not_a_multiple(capsys, config, tmp_path):
    err = train_fails(capsys, config, tmp_path, "data.val_max_captions=12")
    assert_message("`data.val_max_captions` not a multiple", err)


@row("Malformed `--set`")
def test_malformed_set(capsys, config, tmp_path):
    assert_message("Malformed `--set`", train_fails(capsys, config, tmp_path, "train.epochs"))


# ------------------------------------------------------------------------------------------ text model
@row("Text encoder / tokenizer folder missing")
def test_text_encoder_missing(capsys, config, tmp_path):
    err = train_fails(capsys, config, tmp_path, f"model.text_encoder={tmp_path / 'no_bert'}")
    assert_message("Text encoder / tokenizer folder missing", err)
    assert str(tmp_path / "no_bert") in err and len(err.strip().splitlines()) == 1, err
    # a name that is no folder is looked up in the Hugging Face cache, whose message spans lines: still one line
    err = train_fails(capsys, config, tmp_path, "model.text_encoder=no-such-bert-model")
    assert err.startswith("error: text encoder not found") and len(err.strip().splitlines()) == 1, err


BIGRU = ("model.text_backbone=bigru", "model.bigru.word_dim=8", "model.bigru.hidden=32")


@row("BiGRU word vectors file missing")
def test_bigru_word_vectors_missing(capsys, config, tmp_path):
    err = train_fails(capsys, config, tmp_path, *BIGRU, f"model.bigru.glove={tmp_path / 'no_glove.txt'}")
    assert_message("BiGRU word vectors file missing", err)
    assert str(tmp_path / "no_glove.txt") in err and len(err.strip().splitlines()) == 1, err


@row("BiGRU word vectors of another width")
def test_bigru_word_vectors_of_another_width(capsys, config, tmp_path):
    glove = tmp_path / "glove.3d.txt"
    glove.write_text("dog 0.1 0.2 0.3\ncat 0.3 0.2 0.1\n")
    err = train_fails(capsys, config, tmp_path, *BIGRU, f"model.bigru.glove={glove}")
    assert_message("BiGRU word vectors of another width", err)
    assert "3-d word vectors" in err and "is 8" in err and len(err.strip().splitlines()) == 1, err


def test_missing_data_is_reported_before_what_is_derived_from_it(capsys, tmp_path):
    """The shipped F30K config without data: the first error names the data, not the text encoder or the
    concept vocabulary (both missing too), which scripts/build_concepts.py would build from that data."""
    code, err = run_train(capsys, "--config", str(REPO / "configs" / "f30k_coder.yaml"), "--output",
                          str(tmp_path / "run"), "--set", f"data.root={tmp_path / 'f30k_precomp'}")
    assert code == 2 and err.startswith(f"error: missing {tmp_path / 'f30k_precomp' / 'train_ims.npy'};"), err


# ------------------------------------------------------------------------------------------ paths
@row("`--output` naming an existing file")
def test_output_naming_a_file(capsys, config, tmp_path, trained):
    (tmp_path / "taken").write_text("not a folder\n")
    code, err = run_train(capsys, "--config", str(config), "--output", str(tmp_path / "taken"))
    assert code == 2, err
    assert_message("`--output` naming an existing file", err)
    code, err = run_train(capsys, "--config", str(config), "--output", str(tmp_path / "taken" / "run"))
    assert code == 2 and f"{tmp_path / 'taken'} is a file, not a folder" in err  # a parent that is a file
    code, err = run_evaluate(capsys, trained[1] / "model_best.pth", "--output", str(tmp_path / "taken"))
    assert code == 2
    assert_message("`--output` naming an existing file", err)
    assert (tmp_path / "taken").read_text() == "not a folder\n"


@row("`data.root` naming a file")
def test_data_root_naming_a_file(capsys, config, tmp_path, trained):
    (tmp_path / "root.txt").write_text("")
    err = train_fails(capsys, config, tmp_path, f"data.root={tmp_path / 'root.txt'}")
    assert_message("`data.root` naming a file", err)
    code, err = run_evaluate(capsys, trained[1] / "model_best.pth", "--set", f"data.root={tmp_path / 'root.txt'}")
    assert code == 2
    assert_message("`data.root` naming a file", err)


@row("`evaluate.py --checkpoint` naming a folder")
def test_checkpoint_naming_a_folder(capsys, trained):
    code, err = run_evaluate(capsys, trained[1])
    assert code == 2
    assert_message("`evaluate.py --checkpoint` naming a folder", err)


# ------------------------------------------------------------------------------------------ data
@row("Split file missing")
def test_split_file_missing(capsys, config, tmp_path, data):
    (data / "train_ims.npy").unlink()
    assert_message("Split file missing", train_fails(capsys, config, tmp_path))


@row("Features file that is not")
def test_features_not_npy(capsys, config, tmp_path, data):
    (data / "train_ims.npy").write_bytes(b"these are not features\n")
    assert_message("Features file that is not", train_fails(capsys, config, tmp_path))


@row("Features of the wrong rank")
def test_features_wrong_rank(capsys, config, tmp_path, data):
    np.save(data / "train_ims.npy", np.zeros((IMAGES, 36 * REGION_DIM), np.float32))
    err = train_fails(capsys, config, tmp_path)
    assert_message("Features of the wrong rank", err)
    assert f"got shape ({IMAGES}, {36 * REGION_DIM})" in err


@row("Features of the wrong dtype")
def test_features_wrong_dtype(capsys, config, tmp_path, data):
    np.save(data / "train_ims.npy", np.load(data / "train_ims.npy").astype(np.float64))
    assert_message("Features of the wrong dtype", train_fails(capsys, config, tmp_path))


@row("Captions count not a multiple")
def test_captions_not_a_multiple(capsys, config, tmp_path, data):
    with open(data / "train_caps.txt", "a", encoding="utf-8") as f:
        f.write("one caption too many\n")
    err = train_fails(capsys, config, tmp_path)
    assert_message("Captions count not a multiple", err)
    assert f"{IMAGES * CAPTIONS_PER_IMAGE + 1} captions" in err and f"the {IMAGES} image rows" in err


@row("Empty caption line")
def test_empty_caption_line(capsys, config, tmp_path, data):
    lines = (data / "train_caps.txt").read_text(encoding="utf-8").splitlines()
    lines[6] = "   "
    (data / "train_caps.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = train_fails(capsys, config, tmp_path)
    assert_message("Empty caption line", err)
    assert "line 7 is an empty caption" in err


@row("NaN or inf in a feature row")
def test_non_finite_features(capsys, config, tmp_path, data):
    features = np.load(data / "train_ims.npy")
    features[3, 5, 2] = np.inf
    np.save(data / "train_ims.npy", features)
    # a full epoch reads every row; the data set opens fine, the batch holding row 3 fails
    err = train_fails(capsys, config, tmp_path, "train.max_steps_per_epoch=0")
    assert_message("NaN or inf in a feature row", err)
    assert "row 3 holds" in err
    assert not (tmp_path / "run" / "checkpoint_last.pth").exists()


@row("`S_ids.txt` count differs")
def test_ids_count_differs(capsys, config, tmp_path, data):
    ids = (data / "train_ids.txt").read_text().splitlines()
    (data / "train_ids.txt").write_text("\n".join(ids[:-1]) + "\n")
    err = train_fails(capsys, config, tmp_path)
    assert_message("`S_ids.txt` count differs", err)
    assert f"{IMAGES - 1} ids" in err


@row("Region dimension differs")
def test_region_dim_differs(capsys, config, tmp_path):
    err = train_fails(capsys, config, tmp_path, "model.region_dim=32")
    assert_message("Region dimension differs", err)
    assert f"has {REGION_DIM}-d regions" in err


@row("`evaluate.py` on features of another dimension")
def test_evaluate_on_features_of_another_dimension(capsys, trained, tmp_path):
    from coder.demo import generate_demo_data

    other = generate_demo_data(tmp_path / "other", seed=0, train_images=IMAGES, dev_images=2, test_images=2,
                               region_dim=REGION_DIM + 8)
    code, err = run_evaluate(capsys, trained[1] / "model_best.pth", "--set", f"data.root={other}")
    assert code == 2, err
    assert_message("`evaluate.py` on features of another dimension", err)
    assert f"is {REGION_DIM} but {other / 'test_ims.npy'} has {REGION_DIM + 8}-d regions" in err


@row("Batch larger than the training set")
def test_batch_larger_than_data(capsys, config, tmp_path):
    err = train_fails(capsys, config, tmp_path, "train.batch_size=64")
    assert_message("Batch larger than the training set", err)


@row("Memory bank larger than the training set")
def test_memory_bank_larger_than_data(capsys, config, tmp_path):
    err = train_fails(capsys, config, tmp_path, "model.momentum.enabled=true")  # the default 4,096 keys
    assert_message("Memory bank larger than the training set", err)
    assert f"(4096) exceeds the {IMAGES * CAPTIONS_PER_IMAGE} training captions" in err


@row("More PGC prototypes than training pairs")
def test_more_prototypes_than_pairs(capsys, config, tmp_path, data):
    write_vocab(data / "concepts.npz")
    concept = ["model.concept.enabled=true", "model.momentum.enabled=true", "model.momentum.queue_size=8"]
    err = train_fails(capsys, config, tmp_path, *concept)  # the default K = 10,000
    assert_message("More PGC prototypes than training pairs", err)
    assert f"(10000) exceeds the {IMAGES * CAPTIONS_PER_IMAGE} training pairs" in err
    code, err = run_train(capsys, "--config", str(config), "--output", str(tmp_path / "run"), "--set", concept[0],
                          "--set", concept[1], "--set", concept[2], "--set", "loss.pgc_weight=0")
    assert code == 0, err  # without PGC there are no prototypes to count


@row("`data.max_words` beyond the text encoder")
def test_max_words_beyond_the_text_encoder(capsys, config, tmp_path):
    err = train_fails(capsys, config, tmp_path, "data.max_words=600")
    assert_message("`data.max_words` beyond the text encoder", err)
    assert "(600) exceeds the 512 tokens" in err


@row("Region count differs from `model.num_regions`")
def test_num_regions_differs_for_sge(capsys, config, tmp_path, data):
    user = ["model.user.sge=true", "data.region_dropout=0"]
    err = train_fails(capsys, config, tmp_path, *user, "model.num_regions=20")
    assert_message("Region count differs from `model.num_regions`", err)
    assert "has 36 regions per image" in err
    np.save(data / "dev_ims.npy", np.load(data / "dev_ims.npy")[:, :30])  # dev differs: named before training
    err = train_fails(capsys, config, tmp_path, *user)
    assert f"{data / 'dev_ims.npy'} has 30 regions per image" in err
    assert not (tmp_path / "run" / "checkpoint_last.pth").exists()


# ------------------------------------------------------------------------------------------ CLIP
@row("CLIP features missing")
def test_clip_features_missing(capsys, config, tmp_path, data):
    (data / "train_clip.npy").unlink()
    assert_message("CLIP features missing", train_fails(capsys, config, tmp_path, "data.clip_features=true"))


@row("CLIP features with wrong rows or dimension")
def test_clip_features_wrong_shape(capsys, config, tmp_path, data):
    for shape in ((IMAGES, 256), (IMAGES - 1, 512)):
        np.save(data / "train_clip.npy", np.zeros(shape, np.float32))
        err = train_fails(capsys, config, tmp_path, "data.clip_features=true")
        assert_message("CLIP features with wrong rows or dimension", err)
        assert f"shape {shape}" in err


@row("NaN or inf in the CLIP features")
def test_non_finite_clip_features(capsys, config, tmp_path, data):
    clip = np.load(data / "train_clip.npy")
    clip[5, 7] = np.nan
    np.save(data / "train_clip.npy", clip)
    err = train_fails(capsys, config, tmp_path, "data.clip_features=true")
    assert_message("NaN or inf in the CLIP features", err)
    assert f"{data / 'train_clip.npy'}: row 5 holds" in err


# ------------------------------------------------------------------------------------------ concepts
def write_vocab(path: Path, g: int = 6, d: int = 8, **replace) -> Path:
    """A small valid concepts.npz (g concepts, d-d vectors), with any array replaced by `replace`."""
    rng = np.random.default_rng(0)
    cooc = rng.integers(0, 5, (g, g))
    arrays = {"words": np.array([f"w{i}" for i in range(g)]), "pos": np.array(["noun"] * g),
              "counts": rng.integers(5, 9, g), "cooccurrence": np.triu(cooc, 1) + np.triu(cooc, 1).T,
              "glove": rng.standard_normal((g, d)).astype(np.float32)}
    np.savez(path, **{**arrays, **replace})
    return path


def concept_overrides(vocab: Path) -> list[str]:
    """The concept branch with PGC on a tiny vocabulary, sized for the tiny data set."""
    return ["model.concept.enabled=true", "model.momentum.enabled=true", "model.momentum.queue_size=8",
            "cluster.k=4", f"model.concept.vocab={vocab}"]


def concept_fails(capsys, config, tmp_path, vocab: Path) -> str:
    return train_fails(capsys, config, tmp_path, *concept_overrides(vocab))


@row("NaN or inf in the concept vocabulary")
def test_non_finite_concept_vocabulary(capsys, config, tmp_path):
    from coder.concepts import load_concepts

    glove = write_vocab(tmp_path / "ok.npz")
    assert load_concepts(glove).glove.shape == (6, 8)  # valid as written (test_config_properties.py trains on one)
    vectors = np.load(glove)["glove"]
    vectors[3, 1] = np.nan
    err = concept_fails(capsys, config, tmp_path, write_vocab(tmp_path / "nan.npz", glove=vectors))
    assert_message("NaN or inf in the concept vocabulary", err)
    assert "key 'glove' row 3 holds non-finite" in err
    cooc = np.load(glove)["cooccurrence"].astype(np.float64)
    cooc[2, 4] = np.inf
    err = concept_fails(capsys, config, tmp_path, write_vocab(tmp_path / "inf.npz", cooccurrence=cooc))
    assert "key 'cooccurrence' row 2 holds non-finite" in err


@row("Negative counts in the concept graph")
def test_negative_counts_in_the_concept_graph(capsys, config, tmp_path):
    counts = np.arange(6) - 2
    err = concept_fails(capsys, config, tmp_path, write_vocab(tmp_path / "neg.npz", counts=counts))
    assert_message("Negative counts in the concept graph", err)
    assert "key 'counts' row 0 holds negative counts" in err


@row("Concept vocabulary that is not an `.npz` archive")
def test_concept_vocabulary_not_an_archive(capsys, config, tmp_path):
    vocab = write_vocab(tmp_path / "concepts.npz")
    whole = vocab.read_bytes()
    for broken in (b"not a zip", whole[: len(whole) // 2]):
        vocab.write_bytes(broken)
        assert_message("Concept vocabulary that is not an `.npz` archive", concept_fails(capsys, config, tmp_path,
                                                                                         vocab))
    np.save(tmp_path / "single.npy", np.zeros(3))
    assert "got a single array" in concept_fails(capsys, config, tmp_path, tmp_path / "single.npy")
    write_vocab(vocab, glove=np.array([["a"] * 8] * 6))
    assert "key 'glove' has dtype <U1, expected numbers" in concept_fails(capsys, config, tmp_path, vocab)
    write_vocab(vocab).with_suffix(".json").write_text("{not json")
    assert "concepts.json: not valid JSON" in concept_fails(capsys, config, tmp_path, vocab)


@row("Concept vocabulary missing")
def test_concept_vocabulary_missing(capsys, config, tmp_path):
    err = train_fails(capsys, config, tmp_path, "model.concept.enabled=true", "model.momentum.enabled=true",
                      f"model.concept.vocab={tmp_path / 'concepts.npz'}")
    assert_message("Concept vocabulary missing", err)


def build_concepts_script():
    spec = importlib.util.spec_from_file_location("build_concepts_script", REPO / "scripts" / "build_concepts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@row("GloVe file missing")
def test_glove_file_missing(capsys, data, tmp_path):
    code = build_concepts_script().main(["--root", str(data), "--glove", str(tmp_path / "glove.txt"),
                                         "--output", str(tmp_path / "out")])
    assert code == 2
    assert_message("GloVe file missing", capsys.readouterr().err)


@row("GloVe line with the wrong number")
def test_glove_bad_line(capsys, data, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("dog 0.1 0.2 0.3\ncat 0.4 0.5 0.6\nred 0.7 0.8\n", encoding="utf-8")
    code = build_concepts_script().main(["--root", str(data), "--glove", str(glove), "--output", str(tmp_path / "out")])
    assert code == 2
    text = capsys.readouterr().err
    assert_message("GloVe line with the wrong number", text)
    assert f"{glove}:3: expected 3 values, got 2" in text
    assert not (tmp_path / "out" / "concepts.npz").exists()


@row("NaN or inf in a GloVe row")
def test_glove_non_finite_row(capsys, data, tmp_path):
    from coder.tools.vocabulary import heuristic_pos, tokenize

    words = sorted({w for w in tokenize((data / "train_caps.txt").read_text()) if heuristic_pos(w)})
    glove = tmp_path / "glove.txt"
    lines = [f"{w} 0.1 0.2 0.3" for w in words]
    lines[2] = f"{words[2]} 0.1 nan 0.3"
    glove.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = build_concepts_script().main(["--root", str(data), "--glove", str(glove), "--output", str(tmp_path / "out"),
                                         "--pos-method", "heuristic"])
    assert code == 2
    text = capsys.readouterr().err
    assert_message("NaN or inf in a GloVe row", text)
    assert f"{glove}:3: the vector of '{words[2]}' holds non-finite values" in text
    assert not (tmp_path / "out" / "concepts.npz").exists()


# ------------------------------------------------------------------------------------------ checkpoints
@row("Checkpoint missing")
def test_checkpoint_missing(capsys, tmp_path):
    code, err = run_evaluate(capsys, tmp_path / "model_best.pth")
    assert code == 2
    assert_message("Checkpoint missing", err)


@row("Truncated checkpoint")
def test_truncated_checkpoint(capsys, tmp_path, trained):
    data = (trained[1] / "model_best.pth").read_bytes()
    for size in (0, 100, len(data) // 2, len(data) - 1):
        path = tmp_path / "model_best.pth"
        path.write_bytes(data[:size])
        code, err = run_evaluate(capsys, path)
        assert code == 2, size
        assert_message("Truncated checkpoint", err)


class Payload:
    """Unpickling this runs `open(marker, 'w')`: a stand-in for arbitrary code in a foreign pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@row("Pickle with foreign code")
def test_pickle_with_foreign_code_is_refused(capsys, tmp_path):
    marker, path = tmp_path / "code_ran", tmp_path / "model_best.pth"
    torch.save({"format": "coder", "config": {}, "model": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)
    code, err = run_evaluate(capsys, path)
    assert code == 2
    assert_message("Pickle with foreign code", err)
    assert not marker.exists()


@row("A torch file that is not a coder checkpoint")
def test_not_a_coder_checkpoint(capsys, tmp_path):
    path = tmp_path / "weights.pth"
    for obj in ([1, 2, 3], {"state_dict": {"w": torch.zeros(2)}}, {"format": "other", "model": {}, "config": {}}):
        torch.save(obj, path)
        code, err = run_evaluate(capsys, path)
        assert code == 2
        assert_message("A torch file that is not a coder checkpoint", err)


@row("`--resume` with a checkpoint of another config")
def test_resume_with_another_config(capsys, tmp_path, trained):
    config, run = trained
    out = Path(shutil.copytree(run, tmp_path / "run"))
    before = digest(out / "checkpoint_last.pth")
    code, err = run_train(capsys, "--config", str(config), "--output", str(out), "--resume", "auto",
                          "--set", "train.lr=0.001", "--set", "train.epochs=2")
    assert code == 2
    assert_message("`--resume` with a checkpoint of another config", err)
    assert "train.epochs" not in err  # more epochs is a legitimate change on resume
    assert digest(out / "checkpoint_last.pth") == before


@row("`evaluate.py --set` on a model")
def test_evaluate_refuses_model_overrides(capsys, trained):
    code, err = run_evaluate(capsys, trained[1] / "model_best.pth", "--set", "model.embed_dim=64")
    assert code == 2
    assert_message("`evaluate.py --set` on a model", err)


@row("NaN or inf in the embeddings at evaluation")
def test_non_finite_embeddings_at_evaluation(capsys, monkeypatch, tmp_path, trained, config):
    from coder.models.model import ITRModel

    ckpt = torch.load(trained[1] / "model_best.pth", weights_only=True)
    name = next(k for k in ckpt["model"] if k.startswith("image_encoder.") and k.endswith("weight"))
    ckpt["model"][name] = torch.full_like(ckpt["model"][name], float("nan"))  # a diverged image encoder
    torch.save(ckpt, tmp_path / "diverged.pth")
    code, err = run_evaluate(capsys, tmp_path / "diverged.pth")
    assert code == 2
    assert_message("NaN or inf in the embeddings at evaluation", err)
    assert "2 of 2 image embeddings and 0 of 10 caption embeddings" in err

    encode_text = ITRModel.encode_text  # training's dev evaluation: the caption encoder diverges

    def nan_captions(self, *args, **kwargs):
        return {k: v * float("nan") for k, v in encode_text(self, *args, **kwargs).items()}

    monkeypatch.setattr(ITRModel, "encode_text", nan_captions)
    err = train_fails(capsys, config, tmp_path)
    assert_message("NaN or inf in the embeddings at evaluation", err)


@row("`evaluate.py --fold5` on a split that is not 5,000 images")
def test_fold5_needs_5000_images(capsys, trained):
    code, err = run_evaluate(capsys, trained[1] / "model_best.pth", "--fold5")
    assert code == 2
    assert_message("`evaluate.py --fold5` on a split that is not 5,000 images", err)


def test_evaluating_checkpoint_last_keeps_the_best_models_results(capsys, tmp_path, trained):
    run = Path(shutil.copytree(trained[1], tmp_path / "run"))
    best = (run / "eval_test.json").read_bytes()
    assert run_evaluate(capsys, run / "checkpoint_last.pth")[0] == 0
    assert (run / "eval_test.json").read_bytes() == best
    last = json.loads((run / "eval_test_checkpoint_last.json").read_text())
    assert last["checkpoint"]["path"].endswith("checkpoint_last.pth") and last["checkpoint"]["epoch"] == 1
    assert len(last["checkpoint"]["config_sha256"]) == 16


@row("`evaluate.py --eccv` on a split that is not COCO's 5K test")
def test_eccv_needs_coco_5k(capsys, monkeypatch, trained):
    def encode(*args, **kwargs):
        raise AssertionError("the split was encoded before --eccv refused it")

    monkeypatch.setattr("coder.evaluation.splits.evaluate_model", encode)
    code, err = run_evaluate(capsys, trained[1] / "model_best.pth", "--eccv")
    assert code == 2
    assert_message("`evaluate.py --eccv` on a split that is not COCO's 5K test", err)


# ------------------------------------------------------------------------------------------ nothing is lost
@pytest.fixture
def two_epoch_run(tmp_path, data, tiny_bert_dir):
    """Config of a 2-epoch run that saves after every step, and its output folder."""
    config = write_config(tmp_path / "two.yaml", data, tiny_bert_dir, epochs=2)
    config.write_text(config.read_text().replace("save_every: 0", "save_every: 1"))
    return config, tmp_path / "run"


@row("Non-finite loss")
def test_non_finite_loss_keeps_the_last_good_checkpoints(capsys, monkeypatch, two_epoch_run):
    from coder.step import Objective

    config, out = two_epoch_run
    forward, seen = Objective.forward, {}

    def nan_in_epoch_1(self, out_, batch, epoch, *args, **kwargs):
        loss, terms, diag = forward(self, out_, batch, epoch, *args, **kwargs)
        if epoch == 1:
            if not seen:  # what epoch 0 left on disk
                seen.update({name: digest(out / name) for name in ("checkpoint_last.pth", "model_best.pth")})
            loss = loss * float("nan")
        return loss, terms, diag

    monkeypatch.setattr(Objective, "forward", nan_in_epoch_1)
    code, err = run_train(capsys, "--config", str(config), "--output", str(out))
    assert code == 1
    assert_message("Non-finite loss", err)
    assert seen and {name: digest(out / name) for name in seen} == seen  # byte-for-byte what epoch 0 wrote
    assert load_checkpoint(out / "checkpoint_last.pth")["epoch"] == 1
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_non_finite_loss_early_in_a_logging_window_is_not_forgotten(capsys, monkeypatch, config, tmp_path):
    """With train.log_every 2, a NaN loss at step 1 followed by finite steps stops the run at the window's
    check (step 2). The NaN is added to the loss (its gradients stay finite, so the weights do not carry it
    into the later steps): only the flag accumulated over the window remembers it."""
    from coder.step import Objective

    forward, calls = Objective.forward, []

    def nan_at_step_1(self, *args, **kwargs):
        loss, terms, diag = forward(self, *args, **kwargs)
        calls.append(1)
        return (loss + float("nan") if len(calls) == 1 else loss), terms, diag

    monkeypatch.setattr(Objective, "forward", nan_at_step_1)
    code, err = run_train(capsys, "--config", str(config), "--output", str(tmp_path / "run"),
                          "--set", "train.log_every=2", "--set", "train.max_steps_per_epoch=3")
    assert code == 1, err
    assert_message("Non-finite loss", err)
    assert "in epoch 0 near step 2;" in err


def test_a_non_finite_loss_is_never_saved_by_a_mid_epoch_checkpoint(capsys, monkeypatch, config, tmp_path):
    """A NaN at step 1 that reaches the weights, a mid-epoch checkpoint due after that step (save_every 1) and
    no log line before the epoch's end (log_every 100): the run stops before the save, and no checkpoint of
    NaN weights is left to resume from."""
    from coder.step import Objective

    forward = Objective.forward

    def nan_everywhere(self, *args, **kwargs):
        loss, terms, diag = forward(self, *args, **kwargs)
        return loss * float("nan"), terms, diag

    monkeypatch.setattr(Objective, "forward", nan_everywhere)
    out = tmp_path / "run"
    code, err = run_train(capsys, "--config", str(config), "--output", str(out), "--set", "train.log_every=100",
                          "--set", "train.save_every=1")
    assert code == 1, err
    assert "in epoch 0 near step 1;" in err
    assert not (out / "checkpoint_last.pth").exists() and not (out / "model_best.pth").exists()


@row("Disk full while writing a checkpoint")
def test_failed_save_keeps_the_previous_checkpoints(monkeypatch, two_epoch_run):
    config, out = two_epoch_run
    real_save, seen = torch.save, {}

    def disk_fills_in_epoch_1(obj, f, *args, **kwargs):
        # the first mid-epoch save of epoch 1 (after epoch 0 ended with both files written)
        if isinstance(obj, dict) and obj.get("format") == "coder" and obj.get("step_in_epoch", 0) > 0 \
                and obj["epoch"] == 1:
            seen.update({name: digest(out / name) for name in ("checkpoint_last.pth", "model_best.pth")})
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[:1000])  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_in_epoch_1)
    with pytest.raises(OSError) as info:
        train.main(["--config", str(config), "--output", str(out), "--no-progress"])
    assert_message("Disk full while writing a checkpoint", f"{info.type.__name__}: {info.value}")
    assert seen and {name: digest(out / name) for name in seen} == seen
    last, best = load_checkpoint(out / "checkpoint_last.pth"), load_checkpoint(out / "model_best.pth")
    assert (last["epoch"], last["step_in_epoch"], best["epoch"]) == (1, 0, 0)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
