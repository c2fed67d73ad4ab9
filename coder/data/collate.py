"""Batching of precomp items: pads whatever fields the items carry."""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from ..lengths import Lengths

INDEX_KEYS = ("index", "image_index", "row")


def _pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, Lengths]:
    """Zero-pad along the first dimension; returns (batch, lengths), the lengths with their packing indices
    computed here on the CPU, so the training step never reads them back from the device."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    return pad_sequence(sequences, batch_first=True, padding_value=0), Lengths(lengths)


def collate(items: list[dict]) -> dict:
    """Batch items of PrecompDataset, PrecompImages or PrecompCaptions.

    regions -> (B, Lmax, D) zero-padded + region_lengths (B,); input_ids -> (B, Tmax) padded with 0
    (BERT's [PAD]) + text_lengths (B,), both lengths as `Lengths` (`.lengths` is the tensor); index, image_index, row -> LongTensor (B,); clip -> (B, clip_dim).
    """
    if not items:
        raise ValueError("collate got an empty list of items")
    keys = set(items[0])
    for n, item in enumerate(items):
        if set(item) != keys:
            raise ValueError(f"collate: item {n} has keys {sorted(item)}, item 0 has {sorted(keys)}")
    batch = {}
    if "regions" in keys:
        batch["regions"], batch["region_lengths"] = _pad([item["regions"] for item in items])
    if "input_ids" in keys:
        batch["input_ids"], batch["text_lengths"] = _pad([item["input_ids"] for item in items])
    for key in INDEX_KEYS:
        if key in keys:
            batch[key] = torch.tensor([item[key] for item in items], dtype=torch.long)
    if "clip" in keys:
        batch["clip"] = torch.stack([item["clip"] for item in items])
    return batch
