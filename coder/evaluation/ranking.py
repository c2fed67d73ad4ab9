"""Ranking and metrics (CODER §3.5, §4.1): the fused score, the one tie rule, R@K / medr / meanr / R@sum.

Usable on its own: `compute_recalls(sims)` takes any (n_images, 5 * n_images) similarity matrix.

Ties count against the model: a rank counts every other candidate scored >= the positive, so a collapsed
model (all scores equal) gets R@sum 0, never 600. Non-finite scores are an error, never a result. Ranking
runs in float32 at least, whatever precision the encoders used, on the device the scores lie on.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from ..errors import NonFiniteScoresError

RECALL_KS = (1, 5, 10)


# ---------------------------------------------------------------------------------------------- scores
def fuse(instance, concept, beta: float):
    """S = beta S^I + (1 - beta) S^C (CODER §3.5, Eq. 9 at inference). The instance score alone when there is
    no concept score (an instance-only model) or beta >= 1, the concept score alone when beta <= 0: then the
    other one need not be computed (pass None)."""
    if concept is None or beta >= 1:
        return instance
    if beta <= 0:
        return concept
    return beta * instance + (1 - beta) * concept


def fused_similarity(emb: dict[str, Tensor], beta: float, images, captions,
                     pair: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """`fuse` of the instance and concept similarities of `images` (rows of v_*) and `captions` (rows of w_*);
    `pair(v, w)` is the similarity: all pairs (`all_pairs`) or row by row (`row_pairs`)."""
    with_concept = "v_c" in emb and "w_c" in emb and beta < 1
    instance = pair(emb["v_i"][images], emb["w_i"][captions]) if beta > 0 or not with_concept else None
    concept = pair(emb["v_c"][images], emb["w_c"][captions]) if with_concept else None
    return fuse(instance, concept, beta)


def all_pairs(v: Tensor, w: Tensor) -> Tensor:
    return v @ w.t()


def row_pairs(v: Tensor, w: Tensor) -> Tensor:
    return (v * w).sum(-1)


def fused_chunks(emb: dict[str, Tensor], beta: float, image_slice: slice, caption_slice: slice,
                 chunk_size: int) -> Iterator[tuple[int, Tensor]]:
    """The fused similarity (§3.5), one block of images at a time: (first image of the block - image_slice.start,
    (block, captions) scores)."""
    start, stop = image_slice.start, image_slice.stop
    for s in range(start, stop, chunk_size):
        yield s - start, fused_similarity(emb, beta, slice(s, min(s + chunk_size, stop)), caption_slice, all_pairs)


def fused_positives(emb: dict[str, Tensor], beta: float, caption_slice: slice, captions_per_image: int) -> Tensor:
    """The fused score of each caption of `caption_slice` with its own image."""
    captions = torch.arange(caption_slice.start, caption_slice.stop, device=emb["w_i"].device)
    return fused_similarity(emb, beta, captions // captions_per_image, captions, row_pairs)


# ---------------------------------------------------------------------------------------------- ranks
def tie_rank(scores: Tensor, positive_score: Tensor, own: Tensor, dim: int = -1) -> Tensor:
    """The one tie rule (§4.1 protocol, ties against the model): the 0-based rank of a positive is how many
    candidates other than the query's own are scored >= it, counted along `dim`."""
    return ((scores >= positive_score) & ~own).sum(dim=dim)


def ranks_from_chunks(chunks: Iterable[tuple[int, Tensor]], positives: Tensor, n_images: int,
                      captions_per_image: int = 5) -> tuple[Tensor, Tensor]:
    """0-based ranks (on the CPU) from row chunks (first image index, sims of those images to all captions).

    i2t rank of an image = number of other images' captions scored >= its best caption;
    t2i rank of a caption = number of other images scored >= its own image (`positives[j]`).
    Ties count against the model (`tie_rank`). Only one chunk is ever held, so memory is bounded by the
    chunk size; the ranks are counted where the chunks lie (the GPU when the embeddings are there).
    Scores must be finite (see `check_finite`).
    """
    i2t = t2i = caption_image = None
    for start, rows in chunks:
        rows = rows.float()
        if i2t is None:  # allocated where the scores are
            device = rows.device
            i2t = torch.empty(n_images, dtype=torch.long, device=device)
            t2i = torch.zeros(n_images * captions_per_image, dtype=torch.long, device=device)
            caption_image = torch.arange(n_images * captions_per_image, device=device) // captions_per_image
            positives = positives.to(device).float()
        images = torch.arange(start, start + rows.size(0), device=rows.device)
        own = caption_image[None, :] == images[:, None]  # (chunk, n_captions): the image's own captions
        best_own = rows.masked_fill(~own, float("-inf")).amax(dim=1)
        i2t[images] = tie_rank(rows, best_own[:, None], own, dim=1)
        t2i += tie_rank(rows, positives[None, :], own, dim=0)
    if i2t is None:  # no image at all
        return torch.empty(0, dtype=torch.long), torch.zeros(n_images * captions_per_image, dtype=torch.long)
    return i2t.cpu(), t2i.cpu()


def pessimistic_rank(scores: np.ndarray, positive: np.ndarray) -> int:
    """0-based rank of the best positive of one query by `tie_rank` (for i2t the best rank among the image's
    own captions)."""
    scores_t, positive_t = torch.as_tensor(scores), torch.as_tensor(positive)
    return int(tie_rank(scores_t, scores_t[positive_t].max(), positive_t))


# ---------------------------------------------------------------------------------------------- metrics
def _metrics(ranks: Tensor) -> dict[str, float]:
    ranks = ranks.double().cpu()
    out = {f"r{k}": 100.0 * float((ranks < k).double().mean()) for k in RECALL_KS}
    out["medr"] = float(np.floor(np.median(ranks.numpy())) + 1)
    out["meanr"] = float(ranks.mean()) + 1.0
    return out


def recalls_from_ranks(i2t: Tensor, t2i: Tensor) -> dict:
    out = {"i2t": _metrics(i2t), "t2i": _metrics(t2i)}
    out["rsum"] = sum(out[d][f"r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return out


def average_recalls(results: list[dict]) -> dict:
    """Every metric, R@sum included, averaged over folds in order (COCO 5-fold 1K)."""
    avg = {d: {m: float(np.mean([r[d][m] for r in results])) for m in results[0][d]} for d in ("i2t", "t2i")}
    avg["rsum"] = float(np.mean([r["rsum"] for r in results]))
    return avg


def chance_rsum(n_images: int, captions_per_image: int = 5) -> float:
    """Expected R@sum of random scores (no ties): t2i R@K = K / n; i2t R@K = P(one of the image's own
    captions is among the top K of all n * captions_per_image) = 1 - C(N - c, K) / C(N, K)."""
    n_captions = n_images * captions_per_image
    total = 0.0
    for k in RECALL_KS:
        k = min(k, n_images)
        miss = 1.0
        for j in range(min(k, n_captions)):  # C(N - c, K) / C(N, K) as a product
            miss *= max(n_captions - captions_per_image - j, 0) / (n_captions - j)
        total += 100.0 * (1.0 - miss) + 100.0 * k / n_images
    return total


def _as_tensor(sims) -> Tensor:
    return torch.as_tensor(np.asarray(sims)) if not isinstance(sims, Tensor) else sims.detach()


def compute_recalls(sims, captions_per_image: int = 5, chunk_size: int = 1000) -> dict:
    """R@1/5/10, medr, meanr for i2t and t2i, and rsum, from (n_images, n_images * 5) similarities.

    Caption j belongs to image j // captions_per_image. Ties count against the model: a rank counts every
    other candidate scored >= the positive (i2t: >= the best of the image's own captions), so a constant
    matrix scores R@sum 0. A NaN or inf anywhere raises `NonFiniteScoresError`. Ranked in float32 at least.
    """
    sims = _as_tensor(sims)
    n_images = sims.size(0)
    if sims.dim() != 2 or sims.size(1) != n_images * captions_per_image:
        raise ValueError(f"sims must be (n_images, {captions_per_image} * n_images), got {tuple(sims.shape)}")
    if not sims.is_floating_point() or sims.dtype in (torch.float16, torch.bfloat16):
        sims = sims.float()
    bad = int((~torch.isfinite(sims)).sum())
    if bad:
        raise NonFiniteScoresError(f"similarity matrix holds {bad} non-finite (NaN or inf) scores of "
                                   f"{sims.numel()}: the model has diverged; there is no recall to report")
    captions = torch.arange(sims.size(1), device=sims.device)
    positives = sims[captions // captions_per_image, captions]
    chunks = ((s, sims[s:s + chunk_size]) for s in range(0, n_images, chunk_size))
    i2t, t2i = ranks_from_chunks(chunks, positives, n_images, captions_per_image)
    result = recalls_from_ranks(i2t, t2i)
    result["chance_rsum"] = chance_rsum(n_images, captions_per_image)
    return result


def check_finite(emb: dict[str, Tensor]) -> None:
    """Raise `NonFiniteScoresError` naming how many image and caption embeddings hold NaN/inf."""
    counts = {}
    for side, keys in (("image", ("v_i", "v_c")), ("caption", ("w_i", "w_c"))):
        rows = [emb[k] for k in keys if k in emb]
        bad = torch.zeros(rows[0].size(0), dtype=torch.bool, device=rows[0].device)
        for r in rows:
            bad |= ~torch.isfinite(r).all(dim=-1)
        counts[side] = (int(bad.sum()), bad.numel())
    if counts["image"][0] or counts["caption"][0]:
        (bi, ni), (bc, nc) = counts["image"], counts["caption"]
        raise NonFiniteScoresError(f"{bi} of {ni} image embeddings and {bc} of {nc} caption embeddings are "
                                   "non-finite (NaN or inf): the model has diverged; there is no recall to report")


def duplicate_captions(captions: list[str], captions_per_image: int = 5) -> int:
    """How many captions are verbatim equal to a caption of another image (they tie with the positive)."""
    images_of: dict[str, set[int]] = {}
    for j, text in enumerate(captions):
        images_of.setdefault(text.strip(), set()).add(j // captions_per_image)
    return sum(len(images_of[text.strip()]) > 1 for text in captions)
