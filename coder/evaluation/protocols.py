"""The retrieval protocols (CODER §4.1): Flickr30K's 1K test (all images) and COCO's testall as five 1K folds
averaged plus 5K, scored by one model's fused similarity (§3.5) or an ensemble's (the members' fused
similarities averaged, the field's "*" rows)."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..errors import EvaluationError
from .ranking import average_recalls, chance_rsum, fused_chunks, fused_positives, ranks_from_chunks, recalls_from_ranks

Member = tuple[dict[str, Tensor], float]  # one model's embeddings of a split and its own fusion weight


def member(emb: dict[str, Tensor], beta: float) -> Member:
    """(emb, beta) with beta = 1 for an instance-only model (no concept embeddings)."""
    return emb, beta if "v_c" in emb else 1.0


def on_device(emb: dict[str, Tensor], device) -> dict[str, Tensor]:
    """The embeddings where they are ranked: the device a model runs on (a GPU ranks them), else unchanged."""
    return {key: value.to(device) for key, value in emb.items()} if device is not None else emb


def ensemble_chunks(members: Sequence[Member], image_slice: slice, caption_slice: slice,
                    chunk_size: int) -> Iterator[tuple[int, Tensor]]:
    """The members' fused similarities averaged block by block (an ensemble, the field's "*" rows): one block
    per member is held at a time. One member: its own similarities, unchanged."""
    streams = [fused_chunks(emb, beta, image_slice, caption_slice, chunk_size) for emb, beta in members]
    for blocks in zip(*streams):
        yield blocks[0][0], sum(rows for _, rows in blocks) / len(blocks)


def block_ranks(members: Sequence[Member], first_image: int, n_images: int, captions_per_image: int = 5,
                chunk_size: int = 1000) -> tuple[Tensor, Tensor]:
    """(i2t, t2i) 0-based ranks of images [first_image, first_image + n_images) against their own captions,
    scored by the members' averaged fused similarity."""
    images = slice(first_image, first_image + n_images)
    captions = slice(first_image * captions_per_image, (first_image + n_images) * captions_per_image)
    positives = sum(fused_positives(emb, beta, captions, captions_per_image) for emb, beta in members) / len(members)
    return ranks_from_chunks(ensemble_chunks(members, images, captions, chunk_size), positives, n_images,
                             captions_per_image)


def block_recalls(members: Sequence[Member], first_image: int, n_images: int, captions_per_image: int = 5,
                  chunk_size: int = 1000) -> dict:
    """Recalls of images [first_image, first_image + n_images) against their own captions, by the members'
    averaged fused similarity."""
    result = recalls_from_ranks(*block_ranks(members, first_image, n_images, captions_per_image, chunk_size))
    result["chance_rsum"] = chance_rsum(n_images, captions_per_image)
    return result


def rank_block(emb: dict[str, Tensor], beta: float, first_image: int, n_images: int,
               captions_per_image: int = 5, chunk_size: int = 1000) -> dict:
    """Recalls of images [first_image, first_image + n_images) against their own captions."""
    return block_recalls([(emb, beta)], first_image, n_images, captions_per_image, chunk_size)


def evaluate_embeddings(emb: dict[str, Tensor], beta: float = 0.9, captions_per_image: int = 5,
                        fold5: bool = False, chunk_size: int = 1000) -> dict:
    """The protocol's recalls: all images (1K or 5K), and with fold5 the 5-fold 1K average as the main row."""
    return evaluate_members([member(emb, beta)], captions_per_image, fold5, chunk_size)


def evaluate_members(members: Sequence[Member], captions_per_image: int = 5, fold5: bool = False,
                     chunk_size: int = 1000) -> dict:
    """`evaluate_embeddings` for the averaged similarity of one or more models (an ensemble)."""
    n_images = members[0][0]["v_i"].size(0)
    full = block_recalls(members, 0, n_images, captions_per_image, chunk_size)
    if not fold5:
        return full
    fold_size = n_images // 5
    folds = [block_recalls(members, f * fold_size, fold_size, captions_per_image, chunk_size) for f in range(5)]
    result = average_recalls(folds)
    result["chance_rsum"] = folds[0]["chance_rsum"]
    result["folds"] = folds
    result["5k"] = full
    return result


def protocol_ranks(members: Sequence[Member], captions_per_image: int = 5, fold5: bool = False,
                   chunk_size: int = 1000) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-query (i2t, t2i) ranks of the protocol's rows: "main" (all images; with fold5 each query ranked
    within its own 1K fold, so mean hits over the 5,000 equal the 5-fold average) and, with fold5, "5k"."""
    n_images = members[0][0]["v_i"].size(0)
    full = block_ranks(members, 0, n_images, captions_per_image, chunk_size)
    if not fold5:
        return {"main": full}
    size = n_images // 5
    folds = [block_ranks(members, f * size, size, captions_per_image, chunk_size) for f in range(5)]
    return {"main": (torch.cat([i2t for i2t, _ in folds]), torch.cat([t2i for _, t2i in folds])), "5k": full}


def protocol_fold5(cfg: dict, split: str, n_images: int, fold5: bool | None = None) -> bool:
    """COCO testall gets 5-fold 1K (averaged) and 5K unless asked otherwise; --fold5 needs 5,000 images."""
    if fold5 is None:
        return cfg["data"]["dataset"] == "coco" and cfg["eval"]["fold5"] and n_images >= 5000
    if fold5 and n_images != 5000:
        raise EvaluationError(f"--fold5 is COCO's protocol (five 1K folds of the 5,000 testall images); split "
                              f"'{split}' of {cfg['data']['root']} has {n_images} images")
    return fold5
