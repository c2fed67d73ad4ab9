"""Property tests: every config value and every corruption of a tiny data folder ends in a `CoderError`
(the CLI: one `error: ...` line, exit 2; a non-finite loss: exit 1) or a run that trains (exit 0), never in
another exception.

Three properties, all with hypothesis, derandomized (the same examples on every run) and bounded for CI:
(1) every key of the schema, given a value of the wrong type, out of its range or at its edges, is refused
    with a ConfigError naming it, or (edges only) accepted; (2) configs that validate, with keys set to the
    edges of their ranges or to any of their choices, train; (3) a corrupted data folder stops with one line
    or trains. CODER_PROPERTY_SCALE=10 runs ten times the examples (a deeper search, not for CI).
"""
import contextlib
import copy
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import train
from coder.config import DEFAULTS, REGISTRY, SCHEMA, ConfigError, Range, merge, nest, validate
from coder.losses import INSTANCE_LOSSES, POSITIVE_FORMS
from coder.models.aggregators import AGGREGATORS
from coder.models.concept import CONCEPT_ENCODERS, CONCEPT_SCORES
from coder.step import check_config

SCALE = int(os.environ.get("CODER_PROPERTY_SCALE", "1"))
IMAGES, REGION_DIM = 8, 16


def flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


KEYS = flat(DEFAULTS)
_RANGES = {name: key.allowed for name, key in SCHEMA.items() if isinstance(key.allowed, Range)}
_INT_OR_AUTO = tuple(name for name, key in SCHEMA.items() if key.auto)
# the schema's choices and the registries' names (their builders check them)
CHOICES = {name: key.allowed for name, key in SCHEMA.items() if isinstance(key.allowed, tuple)} | {
    "model.aggregator": tuple(AGGREGATORS), "model.concept.encoder": CONCEPT_ENCODERS,
    "model.concept.score": CONCEPT_SCORES, "loss.instance": tuple(INSTANCE_LOSSES), "loss.dcl_positive": POSITIVE_FORMS}


def test_every_registry_key_of_the_schema_has_its_names_here():
    assert {name for name, key in SCHEMA.items() if key.allowed == REGISTRY} <= set(CHOICES)


def examples(n: int):
    """n examples (x CODER_PROPERTY_SCALE), the same on every run; a failure is reported as found, not
    shrunk (each example of the runs trains a model: shrinking would take minutes)."""
    return settings(max_examples=n * SCALE, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])


def test_every_numeric_key_has_a_range():
    numeric = {k for k, v in KEYS.items() if v is None or isinstance(v, (int, float, list)) and not isinstance(v, bool)}
    assert numeric | set(_INT_OR_AUTO) == set(_RANGES)


# ------------------------------------------------------------------------------------------ values
WRONG = ("two", 1.5, 7, True, None, [1], {"a": 1})


def wrong_types(key: str) -> list:
    """Values whose type the key does not take (an int is a float here; text_layers: an int or null)."""
    default = 0 if key in _INT_OR_AUTO else KEYS[key]  # an int or "auto"
    if default is None:
        return [v for v in WRONG if not (v is None or type(v) is int)]
    family = float if type(default) is float else type(default)
    wrong = [v for v in WRONG if not (type(v) is family or family is float and type(v) is int)]
    # a key with `bools` reads YAML 1.1's bare on / off (booleans) as its two names (train.amp: off)
    return [v for v in wrong if not (SCHEMA[key].bools and type(v) is bool)]


def numbers(allowed: Range, integer: bool, inside: bool):
    """Values at the edges of `allowed` (inside) or just past them and far beyond (outside)."""
    step = 1 if integer else 1e-6
    edges = []
    for bound, is_low, is_open in ((allowed.low, True, allowed.low_open), (allowed.high, False, allowed.high_open)):
        if bound is None:
            continue
        past = bound - step if is_low else bound + step
        within = bound + step if is_low else bound - step
        edges += ([within] if is_open else [bound, within]) if inside else ([bound] if is_open else []) + [past]
        if not inside:
            edges.append(bound - 10**6 if is_low else bound + 10**6)
    if not inside and not integer:
        edges += [float("nan"), float("inf"), float("-inf")]
    return edges


def values(key: str, inside: bool) -> list:
    """In-range edges (inside) or out-of-range values of a numeric key; lists get them element-wise."""
    allowed, default = _RANGES[key], 0 if key in _INT_OR_AUTO else KEYS[key]
    integer = type(default) is int or allowed.each is int
    found = numbers(allowed, integer, inside)
    if isinstance(default, list):
        return [[v] for v in found] + ([[]] if inside else [])
    return found + ([None] if inside and allowed.optional else [])


def cases(key: str) -> list[tuple[str, object]]:
    """(kind, value) pairs for one key: 'refused' ones must be a ConfigError, 'edge' ones may pass."""
    out = [("refused", v) for v in wrong_types(key)]
    if key in _RANGES:
        out += [("refused", v) for v in values(key, inside=False)] + [("edge", v) for v in values(key, True)]
    if key in CHOICES:
        out += [("refused", "no-such-choice")] + [("edge", c) for c in CHOICES[key]]
    if key in _INT_OR_AUTO:
        out += [("refused", "no-such-choice"), ("edge", "auto")]
    if isinstance(KEYS[key], bool):
        out += [("edge", True), ("edge", False)]
    return out


@st.composite
def key_and_value(draw):
    key = draw(st.sampled_from(sorted(KEYS)))
    return (key, *draw(st.sampled_from(cases(key))))


@examples(400)
@given(key_and_value())
def test_every_value_of_every_key_is_refused_by_name_or_accepted(case):
    key, kind, value = case
    cfg = copy.deepcopy(DEFAULTS)
    try:
        merge(cfg, nest(key.split("."), value))
        validate(cfg)
        check_config(cfg)
    except ConfigError as err:
        assert f"'{key}'" in str(err) or kind == "edge", err  # an edge may break a relation with another key
        assert "\n" not in str(err)
        return
    assert kind == "edge", f"{key}={value!r} was accepted"


def test_the_out_of_range_values_cover_every_range():
    """The property above sees every key's values on both sides of its range (not just wrong types)."""
    for key in _RANGES:
        assert values(key, inside=False) and values(key, inside=True), key


# ------------------------------------------------------------------------------------------ runs
def write_vocab(path: Path, g: int = 6, d: int = 8) -> Path:
    rng = np.random.default_rng(0)
    cooc = np.triu(rng.integers(0, 5, (g, g)), 1)
    np.savez(path, words=np.array([f"w{i}" for i in range(g)]), pos=np.array(["noun"] * g),
             counts=rng.integers(5, 9, g), cooccurrence=cooc + cooc.T,
             glove=rng.standard_normal((g, d)).astype(np.float32))
    (path.with_suffix(".json")).write_text('{"num_concepts": 6}\n')
    return path


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> Path:
    from coder.demo import generate_demo_data

    root = generate_demo_data(tmp_path_factory.mktemp("property") / "data", seed=0, train_images=IMAGES,
                              dev_images=2, test_images=2, region_dim=REGION_DIM)
    write_vocab(root / "concepts.npz")
    return root


def base_config(root: Path, bert_dir: str) -> dict:
    """The full CODER recipe (concept branch, PGC from epoch 0, memory banks) at toy size: one step."""
    return {"data": {"root": str(root), "clip_features": True},
            "model": {"text_encoder": bert_dir, "region_dim": REGION_DIM, "embed_dim": 8, "aggregator": "mean",
                      "text_layers": 1, "concept": {"enabled": True, "gcn_hidden": 8},
                      "momentum": {"enabled": True, "queue_size": 8}},
            "cluster": {"k": 4, "iters": 2, "start_epoch": 0},
            "train": {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 1, "device": "cpu", "log_every": 1,
                      "save_every": 0},
            "eval": {"batch_size": 16}}


def run(cfg: dict, work: Path) -> tuple[int, str]:
    """train.main on `cfg`: (exit status, stderr)."""
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    err = io.StringIO()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = train.main(["--config", str(path), "--output", str(work / "run"), "--no-progress"])
    finally:  # train.deterministic=true switches PyTorch's global mode on: later tests must not inherit it
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    return code, err.getvalue()


def assert_trains_or_one_line(code: int, err: str, what) -> None:
    assert code in (0, 1, 2), (what, code, err)
    if code:
        assert err.startswith("error: ") and err.strip().count("\n") == 0, (what, err)


# keys left out of the runs: paths and the run name (the data-folder property corrupts the files instead),
# data.prepare (writes the 1,000-image demo), data.num_workers (starts processes; its edge is the default 0)
NOT_RUN = {"name", "data.root", "data.train_split", "data.val_split", "data.test_split", "data.prepare",
           "data.num_workers", "model.text_encoder", "model.concept.vocab"}
RUN_KEYS = sorted(k for k in KEYS if k not in NOT_RUN and [c for kind, c in cases(k) if kind == "edge"])


@st.composite
def edge_settings(draw):
    keys = draw(st.lists(st.sampled_from(RUN_KEYS), min_size=1, max_size=3, unique=True))
    return {k: draw(st.sampled_from([v for kind, v in cases(k) if kind == "edge"])) for k in keys}


def test_validated_edges_train(clean_data, tiny_bert_dir):
    work = Path(tempfile.mkdtemp(dir=clean_data.parent))

    @examples(6)
    @given(edge_settings())
    def check(changes):
        cfg = base_config(clean_data, tiny_bert_dir)
        for key, value in changes.items():
            _set(cfg, key, value)
        shutil.rmtree(work / "run", ignore_errors=True)
        assert_trains_or_one_line(*run(cfg, work), changes)

    check()


def _set(cfg: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


# ------------------------------------------------------------------------------------------ data folder
def pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def corrupt_array(path: Path, how: str, rng: np.random.Generator) -> None:
    array = np.load(path)
    if how == "non-finite":
        array = array.astype(np.float32)
        array.reshape(-1)[rng.integers(array.size)] = pick(rng, [np.nan, np.inf, -np.inf])
    elif how == "dtype":
        array = array.astype(pick(rng, [np.float64, np.float16, np.int32]))
    else:  # shape
        array = pick(rng, [lambda a: a[:-1], lambda a: a[..., :-1], lambda a: a[None], lambda a: a.reshape(-1)])(array)
    np.save(path, array)


def corrupt_npz(path: Path, rng: np.random.Generator) -> None:
    with np.load(path) as data:
        arrays = dict(data)
    key = pick(rng, sorted(arrays))
    choices = [lambda a: None, lambda a: a[:-1], lambda a: a.astype(str), lambda a: -np.abs(a.astype(float)) - 1]
    if arrays[key].dtype.kind in "fiu":
        choices.append(lambda a: np.where(np.arange(a.size).reshape(a.shape) == 0, np.nan, a.astype(float)))
    arrays[key] = pick(rng, choices)(arrays[key])
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def corrupt_text(path: Path, rng: np.random.Generator) -> None:
    lines = path.read_bytes().split(b"\n")
    n = int(rng.integers(len(lines)))
    lines[n:n + 1] = pick(rng, [[], [b""], [b"   "], [lines[n], lines[n]], [b"\xff\xfe caption"], [b"[SEP] ##"]])
    path.write_bytes(b"\n".join(lines))


def corrupt(path: Path, how: str, rng: np.random.Generator) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "folder":
        path.unlink()
        path.mkdir()
    elif how == "truncate":
        path.write_bytes(data[: int(rng.integers(len(data)))])
    elif how == "flip":
        raw = bytearray(data)
        for offset in rng.integers(len(raw), size=int(rng.integers(1, 8))):
            raw[offset] = int(rng.integers(256))
        path.write_bytes(bytes(raw))
    elif path.suffix == ".npy":
        corrupt_array(path, how, rng)
    elif path.suffix == ".npz":
        corrupt_npz(path, rng)
    else:
        corrupt_text(path, rng)


FILES = ("train_ims.npy", "train_caps.txt", "train_ids.txt", "train_clip.npy", "dev_ims.npy", "dev_caps.txt",
         "test_ims.npy", "test_clip.npy", "concepts.npz", "concepts.json")


def kinds(name: str) -> list[str]:
    own = {".npy": ["non-finite", "dtype", "shape"], ".npz": ["values"], ".txt": ["lines"], ".json": []}
    return ["delete", "folder", "truncate", "flip"] + own[Path(name).suffix]


@st.composite
def corruption(draw):
    name = draw(st.sampled_from(FILES))
    return name, draw(st.sampled_from(kinds(name))), draw(st.integers(0, 2**32 - 1))


def test_corrupted_data_folders_stop_with_one_line_or_train(clean_data, tiny_bert_dir):
    work = Path(tempfile.mkdtemp(dir=clean_data.parent))

    @examples(10)
    @given(st.lists(corruption(), min_size=1, max_size=2))
    def check(corruptions):
        shutil.rmtree(work, ignore_errors=True)
        root = Path(shutil.copytree(clean_data, work / "data"))
        for name, how, seed in corruptions:
            if (root / name).is_file():
                corrupt(root / name, how, np.random.default_rng(seed))
        assert_trains_or_one_line(*run(base_config(root, tiny_bert_dir), work), corruptions)

    check()
