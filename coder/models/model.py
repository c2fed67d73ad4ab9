"""The retrieval model (CODER Fig. 2): image and text encoders and the optional concept branch. It maps inputs
to embeddings and knows nothing of losses or training (the momentum key encoders and the banks belong to the
training step, coder/step.py).

Embedding names follow the paper: v_i / w_i are the instance-level v^I / w^I, v_c / w_c the concept-level
v^C / w^C.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..concepts import load_concepts
from ..config import check_choice, concept_vocab_path
from ..errors import ConfigError
from .aggregators import AGGREGATORS
from .concept import CONCEPT_ENCODERS, CONCEPT_SCORES, ConceptGCN, ConceptQuery, normalized_adjacency
from .heads import ImageHead, TextHead
from .text import TextBackbone
from .user import ClipGuidedEnhancement, SelfGuidedEnhancement


class ImageEncoder(nn.Module):
    """Regions (B, L, D) -> v^I: optional USER enhancement (SGE, CGE), then the image head."""

    def __init__(self, head: ImageHead, sge: SelfGuidedEnhancement | None = None,
                 cge: ClipGuidedEnhancement | None = None):
        super().__init__()
        self.sge, self.cge, self.head = sge, cge, head

    def forward(self, regions: Tensor, lengths: Tensor, clip: Tensor | None = None) -> Tensor:
        if self.sge is not None:
            regions = self.sge(regions, lengths)
        if self.cge is not None:
            regions = self.cge(regions, clip)
        return self.head(regions, lengths)


class TextEncoder(nn.Module):
    """Token ids -> (w^I, token states): BERT, then the text head; the states feed the concept queries."""

    def __init__(self, backbone: TextBackbone, head: TextHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, input_ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        states = self.backbone(input_ids, lengths)
        return self.head(states, lengths), states


class ConceptBranch(nn.Module):
    """Concept-level representations (§3.2, Eq. 2): query features v_C^q, w_C^q query the SCC basis Y that
    a GCN produces over the concept graph.

    The queries come from a second, separate pair of aggregator heads over the same regions and token
    states (query_source "heads", §3.2 as written) or are the instance embeddings v^I, w^I themselves
    (query_source "instance", CVSE's design [49]). With detach_query the concept losses do not train what
    the query is read from (BERT's token states, or the instance embeddings)."""

    def __init__(self, gcn: ConceptGCN, image_query: ConceptQuery, text_query: ConceptQuery,
                 query_source: str = "heads", detach_query: bool = False, image_query_head: ImageHead | None = None,
                 text_query_head: TextHead | None = None):
        super().__init__()
        if query_source == "heads" and (image_query_head is None or text_query_head is None):
            raise ValueError("ConceptBranch: query_source 'heads' needs the image and text query heads")
        self.query_source, self.detach_query = query_source, detach_query
        self.image_query_head, self.text_query_head = image_query_head, text_query_head
        self.gcn = gcn
        self.image_query = image_query  # W^v of Eq. 2
        self.text_query = text_query  # W^w of Eq. 2 (the same module as W^v with share_query)

    def _detach(self, x: Tensor) -> Tensor:
        return x.detach() if self.detach_query else x

    def encode_image(self, regions: Tensor, lengths: Tensor, basis: Tensor | None = None,
                     v_i: Tensor | None = None, return_weights: bool = False):
        """v^C [and the Eq. 2 weights a]; `v_i` (the instance embedding) is the query when query_source is
        "instance"."""
        basis = self.gcn() if basis is None else basis
        if self.query_source == "instance":
            if v_i is None:
                raise ValueError("model.concept.query_source 'instance' needs the instance embedding v^I")
            return self.image_query(self._detach(v_i), basis, return_weights)
        return self.image_query(self.image_query_head(regions, lengths), basis, return_weights)

    def encode_text(self, states: Tensor, lengths: Tensor, basis: Tensor | None = None,
                    w_i: Tensor | None = None, return_weights: bool = False):
        """w^C [and the Eq. 2 weights a]; `w_i` (the instance embedding) is the query when query_source is
        "instance"."""
        basis = self.gcn() if basis is None else basis
        if self.query_source == "instance":
            if w_i is None:
                raise ValueError("model.concept.query_source 'instance' needs the instance embedding w^I")
            return self.text_query(self._detach(w_i), basis, return_weights)
        return self.text_query(self.text_query_head(self._detach(states), lengths), basis, return_weights)


class ITRModel(nn.Module):
    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder, concept: ConceptBranch | None = None):
        super().__init__()
        self.image_encoder, self.text_encoder, self.concept = image_encoder, text_encoder, concept

    def encode_image(self, regions: Tensor, lengths: Tensor, clip: Tensor | None = None) -> dict[str, Tensor]:
        out = {"v_i": self.image_encoder(regions, lengths, clip)}
        if self.concept is not None:
            out["v_c"] = self.concept.encode_image(regions, lengths, v_i=out["v_i"])
        return out

    def encode_text(self, input_ids: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        w_i, states = self.text_encoder(input_ids, lengths)
        out = {"w_i": w_i}
        if self.concept is not None:
            out["w_c"] = self.concept.encode_text(states, lengths, w_i=w_i)
        return out

    def forward(self, regions: Tensor, region_lengths: Tensor, input_ids: Tensor, text_lengths: Tensor,
                clip: Tensor | None = None) -> dict[str, Tensor]:
        """Training forward: the query embeddings of both modalities."""
        w_i, states = self.text_encoder(input_ids, text_lengths)
        out = {"v_i": self.image_encoder(regions, region_lengths, clip), "w_i": w_i}
        if self.concept is not None:
            basis = self.concept.gcn()  # Y is shared by both modalities: computed once per step
            out["v_c"] = self.concept.encode_image(regions, region_lengths, basis, v_i=out["v_i"])
            out["w_c"] = self.concept.encode_text(states, text_lengths, basis, w_i=w_i)
        return out


# -------------------------------------------------------------------------------------------- builders
def build_image_encoder(cfg: dict) -> ImageEncoder:
    """`cfg` is the `model` config."""
    user, region_dim, dim = cfg["user"], cfg["region_dim"], cfg["embed_dim"]
    sge = SelfGuidedEnhancement(region_dim, cfg["num_regions"], user["dropout"], user["lambda_att"]) \
        if user["sge"] else None
    cge = ClipGuidedEnhancement(user["clip_dim"], dim, region_dim, user["lambda_att"]) if user["cge"] else None
    return ImageEncoder(ImageHead(region_dim, dim, cfg["aggregator"], cfg["image_fc_init"], cfg["mlp_bn_padding"]),
                        sge, cge)


def build_text_encoder(cfg: dict, bert: nn.Module) -> TextEncoder:
    backbone = TextBackbone(bert, cfg["text_packing"])
    return TextEncoder(backbone, TextHead(backbone.hidden_dim, cfg["embed_dim"], cfg["aggregator"]))


def build_concept_branch(cfg: dict, text_hidden: int, vocab: dict[str, np.ndarray]) -> ConceptBranch:
    dim, ccfg = cfg["embed_dim"], cfg["concept"]
    heads = {}
    if ccfg["query_source"] == "heads":  # §3.2: "another group of feature aggregators"
        heads = {"image_query_head": ImageHead(cfg["region_dim"], dim, cfg["aggregator"]),
                 "text_query_head": TextHead(text_hidden, dim, cfg["aggregator"])}
    gcn = ConceptGCN(torch.as_tensor(vocab["glove"], dtype=torch.float32),
                     normalized_adjacency(vocab["counts"], vocab["cooccurrence"]), ccfg["gcn_hidden"], dim)
    options = {"smoothness": ccfg["smoothness"], "encoder": ccfg["encoder"], "score": ccfg["score"],
               "learn_smoothness": ccfg["learn_smoothness"]}
    image_query = ConceptQuery(dim, **options)
    text_query = image_query if ccfg["share_query"] else ConceptQuery(dim, **options)
    return ConceptBranch(gcn, image_query, text_query, ccfg["query_source"], ccfg["detach_query"], **heads)


def check_model_names(cfg: dict) -> None:
    """The names of a `model` config that registries own (the schema leaves them to the builders)."""
    check_choice("model.aggregator", cfg["aggregator"], AGGREGATORS)
    check_choice("model.concept.encoder", cfg["concept"]["encoder"], CONCEPT_ENCODERS)
    check_choice("model.concept.score", cfg["concept"]["score"], CONCEPT_SCORES)


def build_itr_model(cfg: dict, bert: nn.Module, concept_vocab: dict[str, np.ndarray] | None = None) -> ITRModel:
    """The model of a `model` config with a loaded BERT (and the concept vocabulary, with the concept branch)."""
    check_model_names(cfg)
    image_encoder, text_encoder = build_image_encoder(cfg), build_text_encoder(cfg, bert)
    concept = None
    if cfg["concept"]["enabled"]:
        if concept_vocab is None:
            raise ConfigError("model.concept.enabled needs the concept vocabulary (model.concept.vocab)")
        concept = build_concept_branch(cfg, text_encoder.backbone.hidden_dim, concept_vocab)
    return ITRModel(image_encoder, text_encoder, concept)


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
    return build_itr_model(model_cfg, bert, vocab)
