"""The retrieval model (CODER Fig. 2): encoders, optional concept branch, optional momentum key encoders
with coupled memory banks. It knows nothing about losses or training; it maps inputs to embeddings.

Embedding names follow the paper: v_i / w_i are the instance-level v^I / w^I, v_c / w_c the concept-level
v^C / w^C; v_key / w_key are the momentum encoders' keys that fill the banks B_v / B_w.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..concepts import load_concepts
from ..config import concept_vocab_path
from .heads import ImageHead, TextHead
from .momentum import MomentumContrast
from .text import TextBackbone


class ImageEncoder(nn.Module):
    """Regions (B, L, D) -> v^I: optional USER enhancement (SGE, CGE; SPEC §4.4), then the image head."""

    def __init__(self, cfg: dict):
        super().__init__()
        user = cfg["user"]
        self.sge = self.cge = None
        if user["sge"] or user["cge"]:
            from .user import ClipGuidedEnhancement, SelfGuidedEnhancement

            if user["sge"]:
                self.sge = SelfGuidedEnhancement(cfg["region_dim"], cfg["num_regions"], user["dropout"],
                                                 user["lambda_att"])
            if user["cge"]:
                self.cge = ClipGuidedEnhancement(user["clip_dim"], cfg["embed_dim"], cfg["region_dim"],
                                                 user["lambda_att"])
        self.head = ImageHead(cfg["region_dim"], cfg["embed_dim"], cfg["aggregator"])

    def forward(self, regions: Tensor, lengths: Tensor, clip: Tensor | None = None) -> Tensor:
        if self.sge is not None:
            regions = self.sge(regions, lengths)
        if self.cge is not None:
            regions = self.cge(regions, clip)
        return self.head(regions, lengths)


class TextEncoder(nn.Module):
    """Token ids -> (w^I, token states): BERT, then the text head; the states feed the concept queries."""

    def __init__(self, bert: nn.Module, cfg: dict):
        super().__init__()
        self.backbone = TextBackbone(bert)
        self.head = TextHead(self.backbone.hidden_dim, cfg["embed_dim"], cfg["aggregator"])

    def forward(self, input_ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        states = self.backbone(input_ids, lengths)
        return self.head(states, lengths), states


class ConceptBranch(nn.Module):
    """Concept-level representations (§3.2, Eq. 2): separate query heads over the same regions and token
    states, querying the SCC basis Y produced by a GCN over the concept graph."""

    def __init__(self, cfg: dict, text_hidden: int, vocab: dict[str, np.ndarray]):
        super().__init__()
        from .concept import ConceptGCN, ConceptQuery, normalized_adjacency

        dim = cfg["embed_dim"]
        self.image_query_head = ImageHead(cfg["region_dim"], dim, cfg["aggregator"])
        self.text_query_head = TextHead(text_hidden, dim, cfg["aggregator"])
        adjacency = normalized_adjacency(vocab["counts"], vocab["cooccurrence"])
        self.gcn = ConceptGCN(torch.as_tensor(vocab["glove"], dtype=torch.float32), adjacency,
                              cfg["concept"]["gcn_hidden"], dim)
        self.image_query = ConceptQuery(dim, cfg["concept"]["smoothness"])  # W^v of Eq. 2
        self.text_query = ConceptQuery(dim, cfg["concept"]["smoothness"])  # W^w of Eq. 2

    def encode_image(self, regions: Tensor, lengths: Tensor, basis: Tensor | None = None) -> Tensor:
        basis = self.gcn() if basis is None else basis
        return self.image_query(self.image_query_head(regions, lengths), basis)

    def encode_text(self, states: Tensor, lengths: Tensor, basis: Tensor | None = None) -> Tensor:
        basis = self.gcn() if basis is None else basis
        return self.text_query(self.text_query_head(states, lengths), basis)


class ITRModel(nn.Module):
    def __init__(self, cfg: dict, bert: nn.Module, concept_vocab: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = TextEncoder(bert, cfg)
        self.concept = None
        if cfg["concept"]["enabled"]:
            if concept_vocab is None:
                raise ValueError("model.concept.enabled needs the concept vocabulary (model.concept.vocab)")
            self.concept = ConceptBranch(cfg, self.text_encoder.backbone.hidden_dim, concept_vocab)
        self.momentum = None
        if cfg["momentum"]["enabled"]:
            self.momentum = MomentumContrast(self.image_encoder, self.text_encoder, cfg["embed_dim"],
                                             cfg["momentum"]["queue_size"], cfg["momentum"]["m"])

    def encode_image(self, regions: Tensor, lengths: Tensor, clip: Tensor | None = None) -> dict[str, Tensor]:
        out = {"v_i": self.image_encoder(regions, lengths, clip)}
        if self.concept is not None:
            out["v_c"] = self.concept.encode_image(regions, lengths)
        return out

    def encode_text(self, input_ids: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        w_i, states = self.text_encoder(input_ids, lengths)
        out = {"w_i": w_i}
        if self.concept is not None:
            out["w_c"] = self.concept.encode_text(states, lengths)
        return out

    def forward(self, regions: Tensor, region_lengths: Tensor, input_ids: Tensor, text_lengths: Tensor,
                clip: Tensor | None = None) -> dict[str, Tensor]:
        """Training forward: query embeddings of both modalities, plus momentum keys when banks exist."""
        w_i, states = self.text_encoder(input_ids, text_lengths)
        out = {"v_i": self.image_encoder(regions, region_lengths, clip), "w_i": w_i}
        if self.concept is not None:
            basis = self.concept.gcn()  # Y is shared by both modalities: computed once per step
            out["v_c"] = self.concept.encode_image(regions, region_lengths, basis)
            out["w_c"] = self.concept.encode_text(states, text_lengths, basis)
        if self.momentum is not None:
            out["v_key"], out["w_key"] = self.momentum.keys(
                self.image_encoder, self.text_encoder, regions, region_lengths, input_ids, text_lengths, clip)
        return out


def build_model(cfg: dict, bert: nn.Module, state_dict: dict | None = None) -> ITRModel:
    """The model of a resolved config (`cfg` is the whole config). The concept branch reads the vocabulary
    file, unless `state_dict` (a checkpoint's) already holds its fixed buffers X and A_hat: then only their
    shapes are needed here and `load_state_dict` fills them, so a checkpoint evaluates anywhere."""
    model_cfg = cfg["model"]
    vocab = None
    if model_cfg["concept"]["enabled"]:
        if state_dict is not None and "concept.gcn.word_vectors" in state_dict:
            g, d = state_dict["concept.gcn.word_vectors"].shape
            vocab = {"counts": np.ones(g), "cooccurrence": np.zeros((g, g)), "glove": np.zeros((g, d), np.float32)}
        else:
            concepts = load_concepts(concept_vocab_path(cfg))
            vocab = {"counts": concepts.counts, "cooccurrence": concepts.cooccurrence, "glove": concepts.glove}
    return ITRModel(model_cfg, bert, vocab)
