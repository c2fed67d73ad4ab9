"""Configuration: every key defined once in `SCHEMA` (default, allowed values, one line of doc), YAML loading,
`--set` overrides and validation.

A YAML file may only name keys of the schema, with values of the default's type (ints are accepted where a float
is expected; `None` defaults accept a string, a number or None). The defaults are the CODER paper's values (§4.2)
unless the doc says otherwise. `python train.py --keys` prints the table (docs/config.md is that table).

Names that a registry owns (aggregators, concept encoders and scores, instance losses, DCL's positive form) are
checked by the builder that reads them, with the same one-line error (`check_choice`): this module imports nothing
from the rest of the package but its error class. Configs and checkpoints of older versions are upgraded in
coder/checkpoint.py (`upgrade_config`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError

__all__ = ["SCHEMA", "DEFAULTS", "Key", "Range", "ConfigError", "load_config", "from_dict", "validate", "merge",
           "nest", "parse_override", "register_key", "check_choice", "check_range", "concept_vocab_path", "dump", "get",
           "key_table"]


@dataclass(frozen=True)
class Range:
    """The meaningful values of a numeric key: `low` / `high` (None: unbounded), each included unless
    `low_open` / `high_open`; `optional` admits null; `each` = the element type of a list key."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    each: type | None = None

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self, noun: str = "") -> str:
        """'positive', 'non-negative integers', 'numbers in [0, 1]', 'an integer >= 1', ..."""
        if self.high is None and self.low == 0:
            return f"{'positive' if self.low_open else 'non-negative'} {noun}".strip()
        if self.high is None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low}".strip()
        interval = f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        return f"{noun} in {interval}".strip()


POSITIVE, NON_NEGATIVE, FRACTION, PROBABILITY = Range(0, low_open=True), Range(0), Range(0, 1), \
    Range(0, 1, high_open=True)
SIMILARITY = Range(-1, 1)  # a threshold on cosine similarities, which lie in [-1, 1]
REGISTRY = "registry"  # `allowed` of a key whose names a registry owns: its builder checks them


@dataclass(frozen=True)
class Key:
    """One config key: its default (which fixes its type), its allowed values (a `Range` for numbers, a tuple of
    choices, REGISTRY, or None: any value of the type), a one-line doc, for `loss` keys the terms that read it
    (`reads`: a key set away from its default that no built term reads is refused), and `auto`: an int in the
    range or the string "auto"."""

    default: Any
    doc: str
    allowed: Range | tuple | str | None = None
    reads: tuple[str, ...] = ()
    auto: bool = False
    bools: tuple[str, str] | None = None  # (for false, for true): YAML 1.1 reads a bare off / on as a bool


# the terms of coder/losses/registry.py that read a loss key (memory_dcl_div: M-DCL weighted by Eq. 3)
DCL_FAMILY = ("dcl", "dcl_implicit", "memory_dcl", "memory_dcl_div", "concept")  # Eq. 4-6 and L_DCL^C
DIVERSITY_READERS = ("dcl", "memory_dcl_div", "concept")  # Eq. 3's div weights these

SCHEMA: dict[str, Key] = {
    "name": Key("", "run name; the default output folder is runs/<name> (a config file names it after itself)"),
    # ------------------------------------------------------------------------------------------------ data
    "data.root": Key("data/f30k_precomp", "the precomp folder (S_ims.npy, S_caps.txt per split)"),
    "data.dataset": Key("f30k", "selects the evaluation protocol (CODER §4.1)", ("f30k", "coco")),
    "data.train_split": Key("train", "training split file prefix"),
    "data.val_split": Key("dev", "validation split (model selection, beta)"),
    "data.test_split": Key("test", "test split; COCO: testall (5-fold 1K and 5K)"),
    "data.val_max_captions": Key(5000, "dev is capped to its first N captions (whole images)", POSITIVE),
    "data.captions_per_image": Key(5, "captions per image", POSITIVE),
    "data.max_words": Key(32, "word-pieces per caption, [CLS] and [SEP] included", Range(3)),
    "data.augment": Key(True, "VSE-infinity's training augmentations (region dropout, word corruption)"),
    "data.region_dropout": Key(0.2, "share of regions dropped per training image (VSE-infinity)", PROBABILITY),
    "data.word_corruption": Key(0.2, "share of caption words masked / replaced / deleted (VSE-infinity)", FRACTION),
    "data.num_workers": Key("auto", "DataLoader workers: an int, or auto = 0 on the CPU, on CUDA the process's "
                            "CPUs but one (<= 8)", NON_NEGATIVE, auto=True),
    "data.prepare": Key("", "demo: train.py writes the embedded demo data into data.root on first use", ("", "demo")),
    "data.clip_features": Key(False, "load S_clip.npy (USER's CGE), model.user.clip_dim wide"),
    # the generated world of data.prepare: demo (coder/demo/scenes.py); the shipped demo is the defaults
    "data.demo.seed": Key(0, "the generated world's seed (scenes, prototypes, captions)", Range(0, 2**31 - 1)),
    "data.demo.train_images": Key(1000, "training images of the generated world (5 captions each)",
                                  Range(1, 10**7, high_open=True)),
    "data.demo.dev_images": Key(1000, "dev images of the generated world", Range(1, 10**7, high_open=True)),
    "data.demo.test_images": Key(1000, "test images of the generated world", Range(1, 10**7, high_open=True)),
    "data.demo.noise_std": Key(1.5, "Gaussian noise per region (norm), the generated world's difficulty",
                               Range(0, 1e6, high_open=True)),
    # ----------------------------------------------------------------------------------------------- model
    "model.text_backbone": Key("bert", "bert: a pretrained BERT (model.text_encoder; §4.2); bigru: word embeddings "
                               "+ a bidirectional GRU over the training captions' words (model.bigru; "
                               "VSE-infinity's bigru branch, docs/bigru.md)", ("bert", "bigru")),
    "model.text_encoder": Key("bert-base-uncased", "local BERT folder, cached Hugging Face name, or "
                              "pkg://<module>/<subdir>"),
    "model.embed_dim": Key(1024, "F, the joint embedding space (§4.2); the image head's MLP is F/2 wide", Range(2)),
    "model.region_dim": Key(2048, "region feature width", POSITIVE),
    "model.num_regions": Key(36, "L regions per image (§4.2); USER's SGE needs exactly this many", POSITIVE),
    "model.aggregator": Key("gpo", "feature aggregator of the heads (VSE-infinity's GPO, mean, max; §3.2)", REGISTRY),
    "model.image_fc_init": Key("torch", "the image head's FC init: torch = PyTorch's default, xavier = "
                               "VSE-infinity's (uniform Xavier, zero bias; docs/conformance.md)", ("torch", "xavier")),
    "model.mlp_bn_padding": Key(False, "the image head MLP's BatchNorm also over padded rows, as VSE-infinity's "
                                "(false: real regions only, statistics independent of padding; docs/conformance.md)"),
    "model.text_layers": Key(None, "keep only the first N transformer layers (null: all)",
                             Range(1, optional=True, each=int)),
    "model.text_packing": Key(True, "BERT computes real word-pieces only (the same states up to float rounding)"),
    "model.bigru.word_dim": Key(300, "BiGRU: word vector width (VSE-infinity)", POSITIVE),
    "model.bigru.hidden": Key(1024, "BiGRU: GRU width per direction; with merge mean and hidden = embed_dim the "
                              "text head has no FC (VSE-infinity)", POSITIVE),
    "model.bigru.layers": Key(1, "BiGRU: GRU layers (VSE-infinity: 1)", POSITIVE),
    "model.bigru.merge": Key("mean", "BiGRU: the two directions averaged (VSE-infinity) or concatenated",
                             ("mean", "concat")),
    "model.bigru.min_count": Key(4, "BiGRU: training-caption occurrences a word needs to enter the vocabulary "
                                 "(VSE-infinity: 4)", POSITIVE),
    "model.bigru.vocab": Key("", "BiGRU: a run's vocab.json to reuse; empty: built from the training captions only"),
    "model.bigru.glove": Key("", "BiGRU: GloVe text file for the word vectors (glove.840B.300d.txt); empty: "
                             "uniform +-0.1 (VSE-infinity)"),
    "model.concept.enabled": Key(False, "the concept branch (§3.2, Eq. 2); off for instance-only models"),
    "model.concept.vocab": Key("", "concepts.npz from scripts/build_concepts.py; empty: <data.root>/concepts.npz"),
    "model.concept.gcn_hidden": Key(512, "hidden width of the concept GCN", POSITIVE),
    "model.concept.smoothness": Key(10.0, "lambda of Eq. 2 (kept as a log when learned)", POSITIVE),
    "model.concept.encoder": Key("none", "§3.2's concept-level feature encoders: none = Eq. 2 as printed, "
                                 "cvse = tanh(BN(Linear)) on query and basis as CVSE [49]", REGISTRY),
    "model.concept.score": Key("bilinear", "Eq. 2's score: bilinear q^T W y as printed, cvse = w^T(q*y)+b "
                               "(CVSE [49])", REGISTRY),
    "model.concept.learn_smoothness": Key(False, "train Eq. 2's lambda (from `smoothness`) instead of fixing it"),
    "model.concept.query_source": Key("heads", "the queries v_C^q, w_C^q: heads = another group of aggregators "
                                      "(§3.2 as written), instance = v^I, w^I (CVSE [49])", ("heads", "instance")),
    "model.concept.detach_query": Key(False, "L_DCL^C and L_PGC do not train what the query is read from"),
    "model.concept.share_query": Key(False, "W^w of Eq. 2 is the same parameter (and encoders) as W^v"),
    "model.momentum.enabled": Key(False, "coupled momentum key encoders and memory banks (§3.2, MoCo)"),
    "model.momentum.m": Key(0.995, "momentum m of the key encoders (m = 1 would never update them)", PROBABILITY),
    "model.momentum.queue_size": Key(4096, "entries of each memory bank B_v, B_w", POSITIVE),
    "model.user.sge": Key(False, "USER's self-guided enhancement of the regions"),
    "model.user.cge": Key(False, "USER's CLIP-guided enhancement (reads S_clip.npy)"),
    "model.user.dropout": Key(0.4, "SGE dropout (USER's code)", PROBABILITY),
    "model.user.lambda_att": Key(1.0, "weight of the enhancement's attention output (USER)", NON_NEGATIVE),
    "model.user.clip_dim": Key(512, "width of the precomputed CLIP embeddings CGE reads (ViT-B/32: 512)", POSITIVE),
    # ------------------------------------------------------------------------------------------------ loss
    "loss.instance": Key("dcl", "instance-level batch loss: dcl (Eq. 5), dcl_implicit (Eq. 4), triplet (VSE++), "
                         "infonce, uto (USER), or a name given to coder.losses.register_instance_loss", REGISTRY),
    "loss.instance_weight": Key(3.0, "lambda of Eq. 8 (UTO: USER's lambda on its batch term)", NON_NEGATIVE),
    "loss.margin": Key(0.2, "triplet margin (VSE++)", NON_NEGATIVE, reads=("triplet",)),
    "loss.warmup_epochs": Key(1, "triplet: epochs of all negatives before the hardest (VSE-infinity)", NON_NEGATIVE,
                              reads=("triplet",)),
    "loss.temperature": Key(0.05, "InfoNCE temperature (our choice; the paper gives none)", POSITIVE,
                            reads=("infonce",)),
    "loss.mu": Key(0.1, "mu of Eq. 4-6 (temperature and outer factor)", POSITIVE, reads=DCL_FAMILY),
    "loss.gamma": Key(0.3, "gamma of Eq. 4-6 (margin)", SIMILARITY, reads=DCL_FAMILY),
    "loss.eps": Key(0.1, "epsilon of Eq. 3: div = 1 / sigma(eps / SD)", POSITIVE, reads=DIVERSITY_READERS),
    "loss.dcl_positive": Key("unscaled", "DCL's positive term: paper = mu [neg - log(1 + S_pos)] as printed, "
                             "unscaled = mu neg - log(1 + S_pos) as USER's code (docs/departures.md)", REGISTRY,
                             reads=DCL_FAMILY),
    "loss.detach_diversity": Key(True, "Eq. 3's diversity is a weight, not a gradient path (our reading)",
                                 reads=DIVERSITY_READERS),
    "loss.bank_diversity": Key(True, "with banks, average batch- and bank-level diversity (§3.3, Table 3 MB)",
                               reads=("dcl", "memory_dcl_div")),
    "loss.memory_weight": Key(1.0, "weight of L_M-DCL in Eq. 8 (0: no memory term; UTO: its queue term)",
                              NON_NEGATIVE),
    "loss.mask_own_image": Key(False, "bank entries of the anchor's own image are not its negatives (ablation)",
                               reads=("memory_dcl", "memory_dcl_div")),
    "loss.concept_weight": Key(1.0, "weight of L_DCL^C in Eq. 8", NON_NEGATIVE),
    "loss.pgc_weight": Key(1.0, "weight of L_PGC in Eq. 8", NON_NEGATIVE),
    "loss.uto_alpha": Key(90.0, "USER's UTO alpha", POSITIVE, reads=("uto", "memory_uto")),
    "loss.uto_eps": Key(0.5, "USER's UTO epsilon", SIMILARITY, reads=("uto", "memory_uto")),
    # --------------------------------------------------------------------------------------------- cluster
    "cluster.k": Key(10000, "K prototypes of the online k-means (§3.4)", POSITIVE),
    "cluster.iters": Key(15, "k-means iterations per epoch", POSITIVE),
    "cluster.start_epoch": Key(1, "first epoch of L_PGC (weight 0 before)", NON_NEGATIVE),
    "cluster.chunk_size": Key(65536, "pairs per assignment chunk (bounds memory)", POSITIVE),
    # ----------------------------------------------------------------------------------------------- train
    "train.epochs": Key(30, "training epochs (§4.2)", POSITIVE),
    "train.batch_size": Key(128, "pairs per step and process; in-batch negatives need two", Range(2)),
    "train.optimizer": Key("adam", "adam (§4.2) or adamw", ("adam", "adamw")),
    "train.lr": Key(2e-4, "learning rate (§4.2)", POSITIVE),
    "train.weight_decay": Key(0.0, "weight decay", NON_NEGATIVE),
    "train.lr_decay_epochs": Key([15], "multiply the lr by lr_decay from each of these epochs on (§4.2)",
                                 Range(0, each=int)),
    "train.lr_decay": Key(0.1, "the factor of each decay (0 would stop training)", Range(0, 1, low_open=True)),
    "train.text_lr_mult": Key(0.1, "BERT trains at this times the lr (VSE-infinity's recipe)", NON_NEGATIVE),
    "train.grad_clip": Key(2.0, "max gradient norm (0: no clipping)", NON_NEGATIVE),
    "train.grad_clip_scope": Key("branch", "branch: the concept branch clipped apart from the rest; all: one norm",
                                 ("all", "branch")),
    "train.seed": Key(0, "seed of every random stream (seed + epoch must fit NumPy's seeds)", Range(0, 2**31 - 1)),
    "train.amp": Key("auto", "encoder precision (losses stay float32): auto = bf16 on GPUs with native bf16, fp16 "
                     "with a gradient scaler on older ones, off on the CPU", ("auto", "bf16", "fp16", "off"),
                     bools=("off", "auto")),
    "train.tf32": Key(False, "TF32 for float32 matmuls of the step on CUDA (never for k-means or ranking)"),
    "train.deterministic": Key(False, "bitwise-repeatable CUDA kernels (deterministic algorithms, no autotuning)"),
    "train.compile": Key("off", "torch.compile the training step in place (the model's training forward, the "
                         "momentum encoders, Eq. 8's objective; evaluation stays eager; checkpoints unchanged): "
                         "inductor (true) = PyTorch's compiler, aot_eager / eager = its tracing without code "
                         "generation (checks); off: eager, as the paper trained",
                         ("off", "inductor", "aot_eager", "eager"), bools=("off", "inductor")),
    "train.log_every": Key(10, "steps between logged steps", POSITIVE),
    "train.save_every": Key(500, "steps between mid-epoch checkpoints (0: only at epoch ends)", NON_NEGATIVE),
    "train.keep_last_checkpoint": Key(True, "false: delete checkpoint_last.pth once the run finished"),
    "train.eval_every": Key(1, "epochs between dev evaluations (the last epoch is always evaluated)", POSITIVE),
    "train.max_steps_per_epoch": Key(0, "0 = the full epoch (small values for smoke tests)", NON_NEGATIVE),
    "train.device": Key("auto", "auto | cpu | cuda", ("auto", "cpu", "cuda")),
    "train.dist_timeout_minutes": Key(60.0, "DDP: how long ranks wait at a collective (rank 0 alone runs k-means "
                                      "and the dev evaluation)", POSITIVE),
    "train.gather_batch": Key(True, "DDP: in-batch terms see every rank's embeddings, gathered with gradients"),
    "train.sync_batchnorm": Key(True, "DDP on CUDA: BatchNorm statistics over the global batch"),
    # ------------------------------------------------------------------------------------------------ eval
    "eval.beta": Key(0.9, "fused similarity weight (§3.5); instance-only models use 1", FRACTION),
    "eval.beta_grid": Key([], "non-empty: training picks beta from these by dev R@sum and stores it with the model",
                          Range(0, 1, each=float)),
    "eval.batch_size": Key(256, "encoding batch size", POSITIVE),
    "eval.chunk_size": Key(1000, "images per similarity chunk: bounds the memory of 5K x 25K", POSITIVE),
    "eval.fold5": Key(True, "COCO testall: report 5-fold 1K (averaged) and 5K"),
    "eval.amp": Key(False, "encode for evaluation under bf16 autocast on CUDA (ranking is always float32)"),
}


def nest(keys: list[str], value: Any) -> dict:
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return out


def _nested(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return out


DEFAULTS: dict[str, Any] = _nested({name: key.default for name, key in SCHEMA.items()})


def register_key(name: str, key: Key) -> None:
    """Add a key to the schema from outside coder/ (a loss registered in a user's own module needs its keys):
    the same as a line in SCHEMA."""
    if name in SCHEMA:
        raise ConfigError(f"config key '{name}' exists already")
    *parents, last = name.split(".")
    node = DEFAULTS
    for part in parents:
        node = node.setdefault(part, {})
    SCHEMA[name], node[last] = key, copy.deepcopy(key.default)
_ANY_WHEN_NONE = (str, int, float, type(None))


def merge(base: dict, override: dict, prefix: str = "") -> None:
    """`override` written into `base` key by key; an unknown key or a value of the wrong type is a ConfigError."""
    for key, value in override.items():
        path = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key '{path}'")
        default = base[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' must be a mapping, got {type(value).__name__}")
            merge(default, value, prefix=f"{path}.")
        elif SCHEMA[path].auto and (value == "auto" or _is_number(value, int)):
            base[key] = value
        elif SCHEMA[path].bools is not None and isinstance(value, bool):
            base[key] = SCHEMA[path].bools[value]  # `--set train.amp=off` arrives as False
        else:
            base[key] = _check_type(path, SCHEMA[path].default, value)


def _check_type(path: str, default: Any, value: Any) -> Any:
    if default is None:
        if isinstance(value, _ANY_WHEN_NONE):
            return value
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # PyYAML reads "1e-3" (no dot) as a string; an int past 1e308 overflows
                return float(value)
            except (ValueError, OverflowError):
                pass
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(f"config key '{path}' expects {type(default).__name__}, got {type(value).__name__} ({value!r})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=v` -> (['a', 'b'], v) with v parsed as YAML (so 3, 0.1, true, [15] get their types)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text}: the value is not valid YAML ({str(err).splitlines()[0]})") from err
    return key.strip().split("."), value


def read_yaml(path: Path) -> dict:
    """A config file's mapping; a missing file, one that is not YAML text (a checkpoint, say) or not a mapping is
    one ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not YAML text (byte {err.start} is not UTF-8: a binary file, "
                          f"e.g. a checkpoint?)") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _read_layers(path: Path, seen: tuple = ()) -> list[dict]:
    """A file's mappings from its `base:` ancestors down to itself (an ablation is a diff of its base)."""
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return [data]
    if not isinstance(base, str):
        raise ConfigError(f"config key 'base' in {path} must be a path relative to that file")
    return _read_layers(path.parent / base, seen + (path.resolve(),)) + [data]


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                upgrade: Callable[[dict], dict] | None = None) -> dict:
    """Defaults <- base files <- YAML file <- `--set` overrides, validated; the run is named after the file.
    `upgrade` (coder.checkpoint.upgrade_config, as train.py passes it) translates each layer's values of older
    versions first."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        for layer in _read_layers(path):
            merge(cfg, upgrade(layer) if upgrade is not None else layer)
        cfg["name"] = path.stem
    for text in overrides:
        keys, value = parse_override(text)
        layer = nest(keys, value)
        merge(cfg, upgrade(layer) if upgrade is not None else layer)
    validate(cfg)
    return cfg


def from_dict(data: dict) -> dict:
    """A resolved config (a run's config.yaml, a checkpoint's, already upgraded) merged over today's defaults and
    validated: keys added since take their defaults."""
    cfg = copy.deepcopy(DEFAULTS)
    merge(cfg, copy.deepcopy(data))
    validate(cfg)
    return cfg


def get(cfg: dict, dotted: str) -> Any:
    node = cfg
    for key in dotted.split("."):
        node = node[key]
    return node


def _is_number(value: Any, kind: type | None) -> bool:
    """A finite int (kind int) or finite int/float (otherwise); bools are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        return False
    return math.isfinite(value)


def check_range(key: str, value: Any, allowed: Range) -> None:
    """`config key 'train.lr' must be positive, got -0.1` (docs/bad-inputs.md)."""
    if isinstance(value, list):
        if not all(_is_number(v, allowed.each) and allowed.holds(v) for v in value):
            noun = "integers" if allowed.each is int else "numbers"
            raise ConfigError(f"config key '{key}' must list {allowed.describe(noun)}, got {value!r}")
        return
    if value is None and allowed.optional:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
    if not _is_number(value, allowed.each) or not allowed.holds(value):
        what = allowed.describe("an integer" if allowed.each is int else "")
        raise ConfigError(f"config key '{key}' must be {what}{' or null' if allowed.optional else ''}, got {value!r}")


def check_choice(key: str, value: Any, names) -> None:
    """The one error for a name outside a key's choices (the schema's, or a registry's in its builder)."""
    if value not in tuple(names):
        raise ConfigError(f"config key '{key}' must be one of {tuple(names)}, got {value!r}")


def validate(cfg: dict) -> None:
    """Value checks the type schema cannot express: choices, ranges, and relations between keys."""
    for name, key in SCHEMA.items():
        value = get(cfg, name)
        if isinstance(key.allowed, tuple):
            check_choice(name, value, key.allowed)
        elif isinstance(key.allowed, Range) and not (key.auto and value == "auto"):
            check_range(name, value, key.allowed)
    data, model = cfg["data"], cfg["model"]
    if data["val_max_captions"] % data["captions_per_image"]:
        raise ConfigError(f"config key 'data.val_max_captions' ({data['val_max_captions']}) must be a multiple "
                          f"of 'data.captions_per_image' ({data['captions_per_image']}): whole images only")
    if cfg["loss"]["pgc_weight"] > 0 and model["concept"]["enabled"] and not model["momentum"]["enabled"]:
        raise ConfigError("config key 'loss.pgc_weight' > 0 needs 'model.momentum.enabled' "
                          "(k-means runs on momentum features)")
    if model["user"]["cge"] and not data["clip_features"]:
        raise ConfigError("config key 'model.user.cge' needs 'data.clip_features: true' (CGE reads S_clip.npy)")
    if model["user"]["sge"] and data["augment"] and data["region_dropout"] > 0:
        raise ConfigError("config key 'data.region_dropout' must be 0 with 'model.user.sge' (SGE needs all regions)")


def check_loss_keys(cfg: dict, terms: tuple[str, ...]) -> None:
    """A `loss` key set away from its default that none of the built `terms` reads (per the schema's `reads`):
    a mistake, not a no-op."""
    for name, key in SCHEMA.items():
        value = get(cfg, name)
        if key.reads and not set(key.reads) & set(terms) and value != key.default:
            raise ConfigError(f"config key '{name}' is set ({value!r}) but no term of this objective "
                              f"({', '.join(terms)}; loss.instance '{cfg['loss']['instance']}') reads it")


def concept_vocab_path(cfg: dict) -> str:
    """`model.concept.vocab`, or `<data.root>/concepts.npz` when it is empty: the vocabulary follows the data."""
    return cfg["model"]["concept"]["vocab"] or str(Path(cfg["data"]["root"]) / "concepts.npz")


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def _allowed_text(key: Key) -> str:
    if isinstance(key.allowed, Range):
        return key.allowed.describe("integers" if key.allowed.each is int else "") + (", or 'auto'" if key.auto else "")
    if isinstance(key.allowed, tuple):
        return " \\| ".join(repr(c) for c in key.allowed)
    return "a registered name" if key.allowed == REGISTRY else ""


def key_table() -> str:
    """Every key as a Markdown table row: name, default, allowed values, doc (docs/config.md, train.py --keys)."""
    rows = ["| key | default | allowed | what |", "|---|---|---|---|"]
    rows += [f"| `{name}` | `{key.default!r}` | {_allowed_text(key)} | {key.doc.replace('|', '/')} |"
             for name, key in SCHEMA.items()]
    return "\n".join(rows) + "\n"

