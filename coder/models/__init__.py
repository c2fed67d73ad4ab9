"""The retrieval model (CODER Fig. 2) and its parts; it maps inputs to embeddings and knows nothing of losses."""
from .aggregators import build_aggregator
from .concept import ConceptGCN, ConceptQuery, normalized_adjacency
from .heads import ImageHead, TextHead
from .model import ConceptBranch, ImageEncoder, ITRModel, TextEncoder, build_model
from .momentum import FeatureQueue, MomentumContrast, make_key_encoder, momentum_update
from .text import TextBackbone, load_text_backbone
from .user import ClipGuidedEnhancement, SelfGuidedEnhancement

__all__ = ["build_model", "ITRModel", "ImageEncoder", "TextEncoder", "ConceptBranch", "ImageHead", "TextHead",
           "build_aggregator", "ConceptGCN", "ConceptQuery", "normalized_adjacency", "MomentumContrast",
           "FeatureQueue", "momentum_update", "make_key_encoder", "TextBackbone", "load_text_backbone",
           "SelfGuidedEnhancement", "ClipGuidedEnhancement"]
