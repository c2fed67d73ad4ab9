"""Config keys whose meaningful values depend on the data: checked once the training split is open.

`check_against_data` is the one place for them; each message names the key, its value and the file or
count it disagrees with. The ranges that need no data are in coder/config.py (`validate`).
"""
from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from .precomp import PrecompDataset, _open_npy


def check_against_data(cfg: dict, train_set: PrecompDataset, world: int) -> None:
    """Region shapes (every split the run reads), batch, memory bank, PGC prototypes and caption length
    against the opened training split (`train_set`, with its tokenizer) and `world` processes."""
    data = cfg["data"]
    files = train_set.files
    check_regions(cfg, files.ims_path, files.num_regions, files.region_dim)
    for split in (data["val_split"], data["test_split"]):  # cheap: .npy headers only (memory-mapped)
        path = Path(data["root"]) / f"{split}_ims.npy"
        if path.is_file():  # a missing split is named when the evaluation opens it
            check_regions(cfg, path, *_open_npy(path, rank=3).shape[1:])
    _check_sizes(cfg, len(train_set), world)
    limit = getattr(train_set.tokenizer, "model_max_length", None)
    if isinstance(limit, int) and data["max_words"] > limit:
        raise ConfigError(f"config key 'data.max_words' ({data['max_words']}) exceeds the {limit} tokens the text "
                          f"encoder {cfg['model']['text_encoder']} takes")


def check_regions(cfg: dict, path: Path, num_regions: int, region_dim: int) -> None:
    """The region features of `path` fit the model of `cfg` (training's config, or a checkpoint's)."""
    model = cfg["model"]
    if region_dim != model["region_dim"]:
        raise ConfigError(f"config key 'model.region_dim' is {model['region_dim']} but {path} has "
                          f"{region_dim}-d regions")
    if model["user"]["sge"] and num_regions != model["num_regions"]:
        raise ConfigError(f"config key 'model.num_regions' is {model['num_regions']} but {path} has {num_regions} "
                          f"regions per image; USER's SGE needs exactly model.num_regions")


def _check_sizes(cfg: dict, captions: int, world: int) -> None:
    """Sizes counted in training pairs (one per caption): the batch, the memory bank, the prototypes."""
    root, batch = cfg["data"]["root"], cfg["train"]["batch_size"]
    if captions < batch * world:
        raise ConfigError(f"config key 'train.batch_size' ({batch}) x {world} process(es) exceeds the "
                          f"{captions} training captions in {root}")
    momentum, concept = cfg["model"]["momentum"], cfg["model"]["concept"]
    if momentum["enabled"] and momentum["queue_size"] > captions:
        raise ConfigError(f"config key 'model.momentum.queue_size' ({momentum['queue_size']}) exceeds the {captions} "
                          f"training captions in {root}: the memory bank would hold keys of the same captions "
                          f"more than once")
    k = cfg["cluster"]["k"]
    if concept["enabled"] and cfg["loss"]["pgc_weight"] > 0 and k > captions:  # PGC's prototypes (§3.4)
        raise ConfigError(f"config key 'cluster.k' ({k}) exceeds the {captions} training pairs in {root}: "
                          f"k-means needs at least one pair per prototype")
