"""Configuration: the schema with paper-faithful defaults, YAML loading, `--set` overrides, validation.

`DEFAULTS` is the schema: a YAML file may only name keys that exist here, with values of the same type
(ints are accepted where a float is expected; `None` defaults accept a string or None). Every choice the
paper leaves open is a key here; the defaults are the CODER paper's values (§4.2) unless a comment says
otherwise.
"""
from __future__ import annotations

import copy
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
        "val_max_captions": 5000,  # dev is capped to its first 5,000 captions (precomp format of SCAN/VSE-infinity)
        "captions_per_image": 5,
        "max_words": 32,
        "augment": True,  # VSE-infinity's training augmentations (precomp format of SCAN/VSE-infinity)
        "region_dropout": 0.2,
        "word_corruption": 0.2,
        "num_workers": 0,
        "prepare": "",  # "demo": train.py writes the embedded demo data into data.root on first use
        "clip_features": False,  # load S_clip.npy (USER's CGE), model.user.clip_dim wide
    },
    "model": {
        "text_encoder": "bert-base-uncased",  # local dir, cached HF name, or pkg://<module>/<subdir>
        "embed_dim": 1024,  # F, the joint space (§4.2)
        "region_dim": 2048,
        "num_regions": 36,  # L (§4.2); USER's SGE needs exactly this many
        "aggregator": "gpo",  # gpo | mean | max (VSE-infinity's heads, CODER §3.2)
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
        "user": {  # USER's enhancement modules (USER)
            "sge": False,
            "cge": False,
            "dropout": 0.4,  # SGE dropout (USER's code)
            "lambda_att": 1.0,
            "clip_dim": 512,  # width of the precomputed CLIP embeddings CGE reads (ViT-B/32: 512)
        },
    },
    "loss": {
        # instance-level batch loss: triplet (VSE++ hardest negatives) | infonce | dcl (Eq. 5) |
        # dcl_implicit (Eq. 4) | uto (USER)
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
        "uto_alpha": 90.0,  # USER's UTO (USER)
        "uto_eps": 0.5,
        "uto_lambda": 20.0,
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
        "amp": True,  # bf16 autocast on CUDA; CPU always runs fp32
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


def merge(base: dict, override: dict, prefix: str = "") -> None:
    for key, value in override.items():
        path = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key '{path}'")
        default = base[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' must be a mapping, got {type(value).__name__}")
            merge(default, value, prefix=f"{path}.")
        else:
            base[key] = _check_type(path, default, value)


def _check_type(path: str, default: Any, value: Any) -> Any:
    if default is None:
        if isinstance(value, _ANY_WHEN_NONE):
            return value
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
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
RETIRED_KEYS = ("method", "data.demo", "data.demo_train_images", "data.demo_dev_images", "data.demo_test_images",
                "data.demo_region_dim", "data.demo_seed", "data.clip_dim")


# keys added later whose default changed what the code did: a config written before the key existed gets
# the older behaviour, so its run resumes as it started
EARLIER_BEHAVIOUR = {"loss.dcl_positive": "paper", "train.grad_clip_scope": "all"}


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
    "model.aggregator": ("gpo", "mean", "max"),
    "model.concept.encoder": ("none", "cvse"),
    "model.concept.score": ("bilinear", "cvse"),
    "model.concept.query_source": ("heads", "instance"),
    "loss.instance": ("triplet", "infonce", "dcl", "dcl_implicit", "uto"),
    "loss.dcl_positive": ("paper", "unscaled"),
    "train.optimizer": ("adam", "adamw"),
    "train.grad_clip_scope": ("all", "branch"),
    "train.device": ("auto", "cpu", "cuda"),
}


def get(cfg: dict, dotted: str) -> Any:
    node = cfg
    for key in dotted.split("."):
        node = node[key]
    return node


def validate(cfg: dict) -> None:
    """Cross-key checks the type schema cannot express."""
    for key, choices in _CHOICES.items():
        if get(cfg, key) not in choices:
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {get(cfg, key)!r}")
    for key in ("train.epochs", "train.batch_size", "model.embed_dim", "model.momentum.queue_size", "cluster.k"):
        if get(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {get(cfg, key)}")
    if any(not isinstance(b, (int, float)) or not 0.0 <= b <= 1.0 for b in cfg["eval"]["beta_grid"]):
        raise ConfigError(f"config key 'eval.beta_grid' must list numbers in [0, 1], got {cfg['eval']['beta_grid']}")
    if not 0.0 <= cfg["eval"]["beta"] <= 1.0:
        raise ConfigError(f"config key 'eval.beta' must be in [0, 1], got {cfg['eval']['beta']}")
    if not 0.0 <= cfg["model"]["momentum"]["m"] < 1.0:
        raise ConfigError(f"config key 'model.momentum.m' must be in [0, 1), got {cfg['model']['momentum']['m']}")
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
