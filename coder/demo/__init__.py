"""The embedded demo data set, prepared like a real one (nanoGPT's data/*/prepare.py): synthetic scenes in
the precomp format (`scenes`) and a concept vocabulary from authentic GloVe rows (`glove`). The training
loop never imports this package; `train.py` calls `prepare` when a config says `data.prepare: demo`.
"""
from __future__ import annotations

from pathlib import Path

from ..config import concept_vocab_path
from .glove import ensure_demo_concepts, export_demo_glove
from .scenes import demo_is_current, ensure_demo_data, generate_demo_data

__all__ = ["prepare", "ensure_demo_data", "generate_demo_data", "demo_is_current", "ensure_demo_concepts",
           "export_demo_glove"]


def prepare(cfg: dict) -> None:
    """Write the demo data (and, for the concept branch, its vocabulary) into `data.root` unless current."""
    root = cfg["data"]["root"]
    world = cfg["data"]["demo"]
    ensure_demo_data(root, region_dim=cfg["model"]["region_dim"], seed=world["seed"],
                     train_images=world["train_images"], dev_images=world["dev_images"],
                     test_images=world["test_images"], noise_std=world["noise_std"])
    if cfg["model"]["concept"]["enabled"]:
        ensure_demo_concepts(root, concept_vocab_path(cfg))
    glove = cfg["model"]["bigru"]["glove"]
    if cfg["model"]["text_backbone"] == "bigru" and glove and not Path(glove).is_file():
        export_demo_glove(Path(root) / "train_caps.txt", glove)  # the BiGRU's word vectors: training words
