"""Config loading, `--set` overrides and validation errors that name the key."""
import copy
from pathlib import Path

import pytest

from coder.config import DEFAULTS, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_papers():
    cfg = load_config(None)
    assert cfg["train"]["batch_size"] == 128 and cfg["train"]["lr"] == 2e-4 and cfg["train"]["epochs"] == 30
    assert cfg["loss"]["mu"] == 0.1 and cfg["loss"]["gamma"] == 0.3 and cfg["loss"]["eps"] == 0.1
    assert cfg["loss"]["instance_weight"] == 3.0 and cfg["eval"]["beta"] == 0.9
    assert cfg["model"]["momentum"]["m"] == 0.995 and cfg["model"]["momentum"]["queue_size"] == 4096
    assert cfg["model"]["embed_dim"] == 1024 and cfg["train"]["grad_clip"] == 2.0


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  lr: 1e-3\n")
    cfg = load_config(path, ["train.batch_size=64", "loss.mu=0.2", "train.lr_decay_epochs=[1, 2]"])
    assert cfg["name"] == "exp"
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["batch_size"] == 64
    assert cfg["train"]["lr"] == pytest.approx(1e-3) and isinstance(cfg["train"]["lr"], float)
    assert cfg["loss"]["mu"] == 0.2 and cfg["train"]["lr_decay_epochs"] == [1, 2]
    assert DEFAULTS["train"]["batch_size"] == 128  # defaults are never mutated


@pytest.mark.parametrize("text,override,match", [
    ("train:\n  epoch: 3\n", [], "train.epoch"),  # unknown key in the file
    ("", ["train.batchsize=3"], "train.batchsize"),  # unknown key in --set
    ("", ["nosuch.key=1"], "nosuch"),
    ("train:\n  batch_size: 12.5\n", [], "train.batch_size"),  # wrong type
    ("train:\n  batch_size: big\n", [], "train.batch_size"),
    ("data:\n  augment: 3\n", [], "data.augment"),
    ("train: 5\n", [], "'train' must be a mapping"),
    ("loss:\n  instance: hinge\n", [], "loss.instance"),  # not a choice
    ("train:\n  batch_size: 0\n", [], "train.batch_size"),
    ("eval:\n  beta: 1.5\n", [], "eval.beta"),
    ("", ["train.lr"], "key=value"),
    ("data:\n  demo: true\n", [], "data.demo"),  # a retired key is unknown in a config file
    ("", ["data.prepare=glove"], "data.prepare"),
])
def test_errors_name_the_key(tmp_path, text, override, match):
    from coder.step import check_config  # the names registries own are the builders' to check

    with pytest.raises(ConfigError, match=match):
        check_config(load_config(write(tmp_path, text), override))


def test_base_files_layer_in_order(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\n  batch_size: 32\nloss:\n  mu: 0.5\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: ../base.yaml\ntrain:\n  batch_size: 64\n")
    cfg = load_config(child)
    assert cfg["name"] == "child"
    assert (cfg["train"]["epochs"], cfg["train"]["batch_size"], cfg["loss"]["mu"]) == (7, 64, 0.5)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "orphan.yaml")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1,\n"))


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        cfg = load_config(path)
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), f"{path} must open with a comment naming what it reproduces"
        assert cfg["data"]["root"] and cfg["train"]["epochs"] > 0


def test_checkpoint_configs_drop_retired_keys_and_gain_new_ones():
    from coder.checkpoint import saved_config as from_dict
    from coder.config import DEFAULTS

    old = copy.deepcopy(DEFAULTS)
    old["method"] = "vse"
    old["data"].update({"demo": True, "demo_seed": 0, "clip_dim": 512})
    del old["loss"]["dcl_positive"]  # written before these keys existed
    del old["train"]["grad_clip_scope"]
    del old["model"]["text_packing"]
    cfg = from_dict(old)
    assert "method" not in cfg and "clip_dim" not in cfg["data"] and "demo_seed" not in cfg["data"]
    assert cfg["data"]["demo"] == DEFAULTS["data"]["demo"]  # the old switch dropped; the generated world's defaults
    assert cfg["model"]["text_packing"] == DEFAULTS["model"]["text_packing"]  # same numbers either way
    # keys whose default changed what the code did: an old run resumes with what it trained with
    assert cfg["loss"]["dcl_positive"] == "paper" != DEFAULTS["loss"]["dcl_positive"]
    assert cfg["train"]["grad_clip_scope"] == "all" != DEFAULTS["train"]["grad_clip_scope"]
    current = copy.deepcopy(DEFAULTS)
    assert from_dict(current)["train"]["grad_clip_scope"] == DEFAULTS["train"]["grad_clip_scope"]


def test_a_config_file_that_is_not_yaml_text_is_one_line_naming_it(tmp_path):
    """--config given a checkpoint (binary) by mistake: a ConfigError naming the file, not a UnicodeDecodeError."""
    path = tmp_path / "model_best.pth"
    path.write_bytes(b"PK\x03\x04\x80\x02\xff\xfe" + bytes(range(256)))
    with pytest.raises(ConfigError, match=f"config file {path} is not YAML text") as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_docs_config_page_is_the_schema():
    """docs/config.md holds the table `python -m coder.config` prints from the schema (each key defined once)."""
    from pathlib import Path

    from coder.config import key_table

    page = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    assert key_table() in page, "regenerate the table: python train.py --keys"
