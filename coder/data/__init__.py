"""Data: precomputed region features, caption tokenisation and batching (SCAN/VSE-infinity precomp format)."""
from .collate import collate
from .precomp import DataError, PrecompCaptions, PrecompDataset, PrecompImages, PrecompSplit, drop_regions
from .text import corrupt_words, tokenize_caption

__all__ = ["DataError", "PrecompSplit", "PrecompDataset", "PrecompImages", "PrecompCaptions", "collate",
           "drop_regions", "tokenize_caption", "corrupt_words"]
