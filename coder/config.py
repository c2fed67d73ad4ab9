"""Configuration: the schema with paper-faithful defaults, YAML loading, `--set` overrides, validation.

`DEFAULTS` is the schema: a YAML file may only name keys that exist here, with values of the same type
(ints are accepted where a float is expected; `None` defaults accept a string or None). Every choice the
paper leaves open is a key here; the defaults are the CODER paper's values (§4.2) unless a comment says
otherwise.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import CoderError


class ConfigError(CoderError, ValueError):
    """A config file, key or value is wrong; the message names the key."""


DEFAULTS: dict[str, Any] = {
    "name": "",  # run name; default output dir is runs/<name>
    "data": {
        "root": "data/f30k_precomp",
        "dataset": "f30k",  # f30k | coco: selects the evaluation protocol (CODER §4.1)
        "train_split": "train",
        "val_split": "dev",
        "test_split": "test",  # COCO: testall (5-fold 1K + 5K)
        "val_max_captions": 5000,  # dev is capped to its first 5,000 captions
        "captions_per_image": 5,
        "max_words": 32,
        "augment": True,  # VSE-infinity's training augmentations
        "region_dropout": 0.2,
        "word_corruption": 0.2,
        # DataLoader workers: an int >= 0, or auto = 0 on the CPU, on CUDA the CPUs of this process but one (<= 8)
        "num_workers": "auto",
        "prepare": "",  # "demo": train.py writes the embedded demo data into data.root on first use
        "clip_features": False,  # load S_clip.npy (USER's CGE), model.user.clip_dim wide
    },
    "model": {
        "text_encoder": "bert-base-uncased",  # local dir, cached HF name, or pkg://<module>/<subdir>
        "embed_dim": 1024,  # F, the joint space (§4.2)
        "region_dim": 2048,
        "num_regions": 36,  # L (§4.2); USER's SGE needs exactly this many
        "aggregator": "gpo",  # gpo | mean | max (VSE-infinity's heads, CODER §3.2)
        # the image head's FC initialisation: torch = PyTorch's default; xavier = VSE-infinity's (uniform Xavier,
        # zero bias; EncoderImageAggr.init_weights)
        "image_fc_init": "torch",
        # the image head MLP's BatchNorm: false = real regions only (our choice: statistics independent of the
        # padding region dropout leaves); true = every row, padding included, as VSE-infinity's MLP
        "mlp_bn_padding": False,
        "text_layers": None,  # keep only the first N transformer layers (None = all)
        # BERT computes real word-pieces only (packed; attention masks padding as BERT does): the same states
        # up to float rounding, without the padded tokens of a batch padded to its longest caption
        "text_packing": True,
        "concept": {  # concept branch (§3.2, Eq. 2); off for instance-only models
            "enabled": False,
            "vocab": "",  # concepts.npz from scripts/build_concepts.py; "" = <data.root>/concepts.npz
            "gcn_hidden": 512,
            "smoothness": 10.0,  # lambda in Eq. 2
            # §3.2's "concept-level feature encoders" (Fig. 2(b)), which Eq. 2 does not show: none = Eq. 2 as
            # printed (q^T W y); cvse = tanh(BN(Linear)) on the query and on Y before scoring, as CVSE [49]
            "encoder": "none",
            # Eq. 2's score: bilinear = q^T W y with W in R^{F x F} as printed; cvse = CVSE's [49] w^T (q * y) + b
            "score": "bilinear",
            "learn_smoothness": False,  # Eq. 2's lambda trained (from `smoothness`) instead of fixed
            # §3.2's query features v_C^q, w_C^q: heads = "another group of feature aggregators" as written;
            # instance = the instance embeddings v^I, w^I (CVSE's [49] consensus queries)
            "query_source": "heads",
            # §3.2 / Eq. 8: L_DCL^C and L_PGC do not train what the query is read from (BERT states or v^I, w^I)
            "detach_query": False,
            # Eq. 2: W^w is the same parameter (and encoders) as W^v instead of a separate one
            "share_query": False,
        },
        "momentum": {  # coupled momentum encoders and memory banks (§3.2, MoCo)
            "enabled": False,
            "m": 0.995,
            "queue_size": 4096,
        },
        "user": {  # USER's enhancement modules (GSE: SGE and CGE)
            "sge": False,
            "cge": False,
            "dropout": 0.4,  # SGE dropout (USER's code)
            "lambda_att": 1.0,
            "clip_dim": 512,  # width of the precomputed CLIP embeddings CGE reads (ViT-B/32: 512)
        },
    },
    "loss": {
        # instance-level batch loss: triplet (VSE++ hardest negatives) | infonce | dcl (Eq. 5) |
        # dcl_implicit (Eq. 4) | uto (USER's UTO) | any name given to register_instance_loss
        "instance": "dcl",
        "instance_weight": 3.0,  # lambda in Eq. 8
        "margin": 0.2,  # triplet margin
        "warmup_epochs": 1,  # triplet: epochs of all-negatives before hardest negatives (VSE-infinity)
        "temperature": 0.05,  # InfoNCE temperature (our choice; the paper gives none)
        "mu": 0.1,  # Eq. 4-5
        "gamma": 0.3,
        "eps": 0.1,  # Eq. 3
        # DCL's positive term (Eq. 4-6, L_DCL^I, M-DCL and L_DCL^C): "paper" = mu * [neg - log(1 + S_pos)]
        # as printed; "unscaled" = mu * neg - log(1 + S_pos), as USER's code. Default chosen by the seeded
        # demo study on dev (README: "Where we depart from the printed equations").
        "dcl_positive": "unscaled",
        "detach_diversity": True,  # diversity is a weight, not a gradient path (our reading of Eq. 3)
        "bank_diversity": True,  # average batch and bank diversity when banks exist (§3.3, Table 3 "MB")
        "memory_weight": 1.0,  # L_M-DCL in Eq. 8 (0 disables it; banks may still feed diversity)
        "mask_own_image": False,  # drop queue entries of the anchor's own image from its negatives
        "concept_weight": 1.0,  # L_DCL^C in Eq. 8
        "pgc_weight": 1.0,  # L_PGC in Eq. 8
        # USER's UTO; its batch term is weighted by instance_weight (USER's lambda), its queue term by memory_weight
        "uto_alpha": 90.0,
        "uto_eps": 0.5,
    },
    "cluster": {  # online k-means for PGC labels (§3.4)
        "k": 10000,
        "iters": 15,
        "start_epoch": 1,  # PGC weight is 0 before this epoch
        "chunk_size": 65536,
    },
    "train": {
        "epochs": 30,
        "batch_size": 128,
        "optimizer": "adam",  # adam | adamw
        "lr": 2e-4,
        "weight_decay": 0.0,
        "lr_decay_epochs": [15],  # multiply lr by lr_decay at each of these epochs
        "lr_decay": 0.1,
        "text_lr_mult": 0.1,  # BERT parameters train at 0.1 x lr
        "grad_clip": 2.0,  # max gradient norm (0: no clipping)
        # branch: the concept branch (its encoders, W, the PGC classifier) and the rest are clipped apart, so
        # the concept losses' larger gradients do not rescale the instance ones; all: one norm over everything
        "grad_clip_scope": "branch",
        "seed": 0,
        # mixed precision of the encoders (the losses always run in float32): auto = bf16 on GPUs with native
        # bf16 (Ampere and later), fp16 with a gradient scaler on older ones, off on the CPU
        "amp": "auto",
        # TF32 for float32 matmuls in the training step on CUDA (Ampere+). Off: the paper trained in fp32, and the
        # losses are computed in float32 from similarities that TF32 would round to ~3 digits; k-means
        # assignment and ranking never use it (coder/precision.py)
        "tf32": False,
        # bitwise-repeatable CUDA kernels: deterministic algorithms, cuDNN without autotuning, cuBLAS's workspace
        "deterministic": False,
        "log_every": 10,
        "save_every": 500,  # steps between mid-epoch checkpoints (0: only at epoch ends)
        "keep_last_checkpoint": True,  # false: delete checkpoint_last.pth (twice model_best's size) once finished
        "eval_every": 1,  # epochs between dev evaluations
        "max_steps_per_epoch": 0,  # 0 = full epoch (small values for smoke tests)
        "device": "auto",  # auto | cpu | cuda
        # DDP: how long ranks wait at a collective (rank 0 alone runs the k-means iterations and the dev
        # evaluation; a COCO pass can outlast NCCL's 10-minute default)
        "dist_timeout_minutes": 60.0,
        # DDP: the in-batch terms (Eq. 3-5, triplet, L_DCL^C, PGC, UTO) see every rank's embeddings, gathered
        # with gradients, so N x batch_size trains like one batch of N x batch_size (false: each rank's own)
        "gather_batch": True,
        # DDP on CUDA: BatchNorm statistics over the global batch (PyTorch's SyncBatchNorm has no CPU kernel)
        "sync_batchnorm": True,
    },
    "eval": {
        "beta": 0.9,  # fused similarity weight (§3.5); instance-only models use 1
        "beta_grid": [],  # non-empty: training picks beta from these by dev R@sum and stores it with the model
        "batch_size": 256,
        "chunk_size": 1000,  # images per similarity chunk: bounds memory of 5K x 25K
        "fold5": True,  # COCO testall: report 5-fold 1K (averaged) and 5K
        "amp": False,  # encode for evaluation under bf16 autocast on CUDA (ranking is always float32)
    },
}

_ANY_WHEN_NONE = (str, int, float, type(None))
_INT_OR_AUTO = ("data.num_workers",)  # an int, or the string "auto"


def merge(base: dict, override: dict, prefix: str = "") -> None:
    for key, value in override.items():
        path = f"{prefix}{key}"
        if key not in base:
            moved = f": it is retired, use {MOVED_KEYS[path]}" if path in MOVED_KEYS else ""
            raise ConfigError(f"unknown config key '{path}'{moved}")
        default = base[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' must be a mapping, got {type(value).__name__}")
            merge(default, value, prefix=f"{path}.")
        elif path in _INT_OR_AUTO and (value == "auto" or (isinstance(value, int) and not isinstance(value, bool))):
            base[key] = value
        else:
            value = LEGACY_VALUES.get(path, {}).get(value, value) if isinstance(value, bool) else value
            base[key] = _check_type(path, default, value)


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
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
    elif isinstance(value, type(default)):
        return value
    raise ConfigError(
        f"config key '{path}' expects {type(default).__name__}, got {type(value).__name__} ({value!r})"
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=v` -> (['a', 'b'], v) with v parsed as YAML (so 3, 0.1, true, [15] get their types)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def nest(keys: list[str], value: Any) -> dict:
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return out


def _read_layers(path: Path, seen: tuple = ()) -> list[dict]:
    """A file's mappings from its `base:` ancestors down to itself (an ablation is a diff of its base)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return [data]
    if not isinstance(base, str):
        raise ConfigError(f"config key 'base' in {path} must be a path relative to that file")
    return _read_layers(path.parent / base, seen + (path.resolve(),)) + [data]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """Defaults <- base files <- YAML file <- `--set` overrides, validated; the run is named after the file."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        for layer in _read_layers(path):
            merge(cfg, layer)
        cfg["name"] = path.stem
    for text in overrides:
        keys, value = parse_override(text)
        merge(cfg, nest(keys, value))
    validate(cfg)
    return cfg


# keys of older versions, dropped when a checkpoint's config is read (their job moved or they did nothing)
RETIRED_KEYS = ("method", "loss.uto_lambda", "data.demo", "data.demo_train_images", "data.demo_dev_images",
                "data.demo_test_images", "data.demo_region_dim", "data.demo_seed", "data.clip_dim")


# keys added later whose default changed what the code did: a config written before the key existed gets
# the older behaviour, so its run resumes as it started
EARLIER_BEHAVIOUR = {"loss.dcl_positive": "paper", "train.grad_clip_scope": "all"}

# keys whose job another key took over: named in the error for a config that still sets them
MOVED_KEYS = {"loss.uto_lambda": "loss.instance_weight (UTO's batch term is Eq. 8's instance term; its queue "
                                 "term is weighted by loss.memory_weight)"}
# values of older versions, translated where a config or checkpoint is read
LEGACY_VALUES = {"train.amp": {True: "auto", False: "off"}}


def _holder(data: dict, dotted: str) -> tuple[dict | None, str]:
    """The dict in `data` that holds `dotted`'s last key (None when a parent is missing), and that key."""
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), last


def from_dict(data: dict) -> dict:
    """A resolved config (e.g. from a checkpoint) merged over the current defaults and validated; keys added
    since take their defaults (or, in EARLIER_BEHAVIOUR, what the code did before them), retired keys are
    dropped."""
    cfg = copy.deepcopy(DEFAULTS)
    data = copy.deepcopy(data)
    for dotted, value in EARLIER_BEHAVIOUR.items():
        node, last = _holder(data, dotted)
        if node is not None:
            node.setdefault(last, value)
    loss = data.get("loss")
    if isinstance(loss, dict) and "uto_lambda" in loss and loss.get("instance") == "uto":
        # UTO once ignored the Eq. 8 weights and used lambda_uto x batch + queue
        loss["instance_weight"], loss["memory_weight"] = loss["uto_lambda"], 1.0
    for dotted in RETIRED_KEYS:
        node, last = _holder(data, dotted)
        if node is not None:
            node.pop(last, None)
    merge(cfg, data)
    validate(cfg)
    return cfg


_CHOICES = {
    "data.prepare": ("", "demo"),
    "data.dataset": ("f30k", "coco"),
    "model.concept.query_source": ("heads", "instance"),
    "train.optimizer": ("adam", "adamw"),
    "train.grad_clip_scope": ("all", "branch"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.device": ("auto", "cpu", "cuda"),
}


def choices() -> dict[str, tuple]:
    """Every key with a fixed set of values; where a module owns the names (a registry), they come from it."""
    from .losses.dcl import POSITIVE_FORMS
    from .losses.objective import INSTANCE_LOSSES
    from .models.aggregators import AGGREGATORS
    from .models.concept import CONCEPT_ENCODERS, CONCEPT_SCORES
    from .models.heads import FC_INITS

    return {**_CHOICES, "model.aggregator": tuple(AGGREGATORS), "model.image_fc_init": FC_INITS,
            "model.concept.encoder": CONCEPT_ENCODERS, "model.concept.score": CONCEPT_SCORES,
            "loss.instance": tuple(INSTANCE_LOSSES), "loss.dcl_positive": POSITIVE_FORMS}


def get(cfg: dict, dotted: str) -> Any:
    node = cfg
    for key in dotted.split("."):
        node = node[key]
    return node


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

# Every int/float key of DEFAULTS and its range (the schema checks the type, this table the value);
# relations with the data (cluster.k vs the training pairs, ...) are in coder/data/checks.py.
_RANGES = {
    "data.val_max_captions": POSITIVE, "data.captions_per_image": POSITIVE,
    "data.max_words": Range(3),  # [CLS], one word-piece, [SEP]
    "data.region_dropout": PROBABILITY,  # dropping every region would leave an image empty
    "data.word_corruption": FRACTION, "data.num_workers": NON_NEGATIVE,
    "model.embed_dim": Range(2),  # the image head's MLP is embed_dim / 2 wide (VSE-infinity)
    "model.region_dim": POSITIVE, "model.num_regions": POSITIVE,
    "model.text_layers": Range(1, optional=True, each=int),
    "model.concept.gcn_hidden": POSITIVE, "model.concept.smoothness": POSITIVE,  # lambda of Eq. 2, kept as log
    "model.momentum.m": PROBABILITY,  # m = 1 would never update the key encoders (MoCo)
    "model.momentum.queue_size": POSITIVE,
    "model.user.dropout": PROBABILITY, "model.user.lambda_att": NON_NEGATIVE, "model.user.clip_dim": POSITIVE,
    "loss.instance_weight": NON_NEGATIVE, "loss.margin": NON_NEGATIVE, "loss.warmup_epochs": NON_NEGATIVE,
    "loss.temperature": POSITIVE, "loss.mu": POSITIVE,  # both divide the similarities (Eq. 4-5)
    "loss.gamma": SIMILARITY, "loss.eps": POSITIVE,  # Eq. 3: sigma(eps / SD)
    "loss.memory_weight": NON_NEGATIVE, "loss.concept_weight": NON_NEGATIVE, "loss.pgc_weight": NON_NEGATIVE,
    "loss.uto_alpha": POSITIVE, "loss.uto_eps": SIMILARITY,
    "cluster.k": POSITIVE, "cluster.iters": POSITIVE, "cluster.start_epoch": NON_NEGATIVE,
    "cluster.chunk_size": POSITIVE,
    "train.epochs": POSITIVE, "train.lr": POSITIVE,
    "train.batch_size": Range(2),  # in-batch negatives (Eq. 3-5) and BatchNorm over the batch need two pairs
    "train.weight_decay": NON_NEGATIVE, "train.lr_decay_epochs": Range(0, each=int),
    "train.lr_decay": Range(0, 1, low_open=True), "train.text_lr_mult": NON_NEGATIVE,
    "train.grad_clip": NON_NEGATIVE,
    "train.seed": Range(0, 2**31 - 1),  # NumPy seeds (seed + epoch) must be non-negative and below 2**32
    "train.log_every": POSITIVE, "train.save_every": NON_NEGATIVE, "train.eval_every": POSITIVE,
    "train.max_steps_per_epoch": NON_NEGATIVE, "train.dist_timeout_minutes": POSITIVE,
    "eval.beta": FRACTION, "eval.beta_grid": Range(0, 1, each=float), "eval.batch_size": POSITIVE,
    "eval.chunk_size": POSITIVE,
}


def _is_number(value: Any, kind: type | None) -> bool:
    """A finite int (kind int) or finite int/float (otherwise); bools are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        return False
    return math.isfinite(value)


def check_range(key: str, value: Any, allowed: Range) -> None:
    """The README's form: `config key 'train.lr' must be positive, got -0.1`."""
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
        raise ConfigError(f"config key '{key}' must be {what}{' or null' if allowed.optional else ''}, "
                          f"got {value!r}")


def validate(cfg: dict) -> None:
    """Value checks the type schema cannot express: choices, ranges, and relations between keys."""
    from .losses.objective import check_loss_keys

    for key, allowed in choices().items():
        if get(cfg, key) not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {allowed}, got {get(cfg, key)!r}")
    for key, allowed in _RANGES.items():
        if not (key in _INT_OR_AUTO and get(cfg, key) == "auto"):
            check_range(key, get(cfg, key), allowed)
    check_loss_keys(cfg)
    data = cfg["data"]
    if data["val_max_captions"] % data["captions_per_image"]:
        raise ConfigError(f"config key 'data.val_max_captions' ({data['val_max_captions']}) must be a multiple "
                          f"of 'data.captions_per_image' ({data['captions_per_image']}): whole images only")
    if cfg["loss"]["pgc_weight"] > 0 and cfg["model"]["concept"]["enabled"] and not cfg["model"]["momentum"]["enabled"]:
        raise ConfigError("config key 'loss.pgc_weight' > 0 needs 'model.momentum.enabled' "
                          "(k-means runs on momentum features)")
    if cfg["model"]["user"]["cge"] and not cfg["data"]["clip_features"]:
        raise ConfigError("config key 'model.user.cge' needs 'data.clip_features: true' (CGE reads S_clip.npy)")
    if cfg["model"]["user"]["sge"] and cfg["data"]["augment"] and cfg["data"]["region_dropout"] > 0:
        raise ConfigError(
            "config key 'data.region_dropout' must be 0 with 'model.user.sge' (SGE needs all regions)"
        )


def concept_vocab_path(cfg: dict) -> str:
    """`model.concept.vocab`, or `<data.root>/concepts.npz` when it is empty: the vocabulary follows the data."""
    return cfg["model"]["concept"]["vocab"] or str(Path(cfg["data"]["root"]) / "concepts.npz")


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
