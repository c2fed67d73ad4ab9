"""Leakage (CODER §3.2, Eq. 2): a caption's embedding depends on that caption alone, never on the other captions of
its image or of its batch; the concept branch uses no ground-truth concept labels."""
import numpy as np
import pytest
import torch

from coder.config import load_config
from coder.models.model import build_itr_model
from coder.models.text import load_text_backbone


@pytest.fixture(scope="module")
def concept_model(tiny_bert_dir):
    cfg = load_config(None, ["model.region_dim=16", "model.embed_dim=32", "model.concept.enabled=true",
                             "model.momentum.enabled=true", "model.momentum.queue_size=8"])
    rng = np.random.default_rng(0)
    co = rng.integers(0, 30, (12, 12))
    vocab = {"counts": rng.integers(40, 90, 12), "cooccurrence": np.triu(co, 1) + np.triu(co, 1).T,
             "glove": rng.normal(size=(12, 8)).astype(np.float32)}
    bert, tokenizer = load_text_backbone(tiny_bert_dir)
    torch.manual_seed(0)
    return build_itr_model(cfg["model"], bert, vocab).eval(), tokenizer


def encode(model, tokenizer, captions):
    enc = tokenizer(captions, padding=True, return_tensors="pt")
    lengths = enc["attention_mask"].sum(1)
    with torch.no_grad():
        return model.encode_text(enc["input_ids"], lengths)


def test_caption_embedding_ignores_the_other_captions_of_its_image(concept_model):
    model, tok = concept_model
    own = ["a brown dog runs on the beach", "dog on sand", "a dog playing near the sea",
           "an animal runs", "a small brown dog outside by the water at noon"]
    changed = [own[0], "two red buses in a busy street at night", "a cat", "people", "a kitchen"]
    alone = encode(model, tok, own[:1])
    for batch in (own, changed, own[:1] + own[3:]):
        out = encode(model, tok, batch)
        for key in ("w_i", "w_c"):
            torch.testing.assert_close(out[key][0], alone[key][0], atol=1e-5, rtol=1e-5)


def test_image_embedding_ignores_its_batch_in_eval_mode(concept_model):
    model, _ = concept_model
    regions = torch.randn(3, 36, 16)
    lengths = torch.tensor([36, 20, 30])
    with torch.no_grad():
        full = model.encode_image(regions, lengths)
        alone = model.encode_image(regions[1:2], lengths[1:2])
    for key in ("v_i", "v_c"):
        torch.testing.assert_close(full[key][1], alone[key][0], atol=1e-5, rtol=1e-5)
