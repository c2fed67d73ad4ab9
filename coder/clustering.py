"""Online spherical k-means for CODER's prototype labels z (paper §3.4).

Lloyd iterations on the unit sphere: assign each point to the centroid of highest cosine, then set
each centroid to the normalised sum of its points. Chunked matmuls on x's device keep memory at
chunk_size x k similarities; a warm start from the previous epoch's centroids keeps cluster ids
aligned with the prototype classifier P^C.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import distributed as dist
from .data import collate
from .data.workers import loader_options


@dataclass
class KMeansResult:
    centroids: Tensor  # (k, F) unit rows, float32
    labels: Tensor  # (N,) long, labels[i] = argmax_j cos(x_i, centroids_j)
    inertia: list[float]  # sum_i (1 - cos(x_i, c_{labels_i})) after each assignment step
    sizes: Tensor  # (k,) long, points per cluster


def _assign(x: Tensor, centroids: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Best centroid (labels) and its cosine for every row of x, chunk by chunk."""
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    best = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        chunk = F.normalize(x[start:start + chunk_size].float(), dim=1)
        best[start:start + chunk_size], labels[start:start + chunk_size] = (chunk @ centroids.T).max(dim=1)
    return labels, best


def _update(x: Tensor, labels: Tensor, best: Tensor, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """New centroids = normalised sums of their points; empty clusters re-seeded from the points
    farthest from their own centroid (deterministic: stable sort, then index order)."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        chunk = F.normalize(x[start:start + chunk_size].float(), dim=1)
        sums.index_add_(0, labels[start:start + chunk_size], chunk)
    sizes = torch.bincount(labels, minlength=k)
    empty = (sizes == 0).nonzero().flatten()
    centroids = F.normalize(sums, dim=1)
    if empty.numel():
        farthest = torch.sort(best, stable=True).indices  # lowest cosine first
        picks = farthest[torch.arange(empty.numel(), device=x.device) % x.shape[0]]  # k > N: reuse points
        centroids[empty] = F.normalize(x[picks].float(), dim=1)
    return centroids, sizes


def _inertia(best: Tensor) -> float:
    """sum_i (1 - cos_i) in float64; cos above 1 by rounding counts as 0."""
    return float((1.0 - best.double()).clamp_min(0.0).sum())


def _random_init(x: Tensor, k: int, seed: int) -> Tensor:
    """k distinct random rows of x (repeating the permutation when k > N), seeded on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=generator)
    picks = order[torch.arange(k) % x.shape[0]].to(x.device)
    return F.normalize(x[picks].float(), dim=1)


def spherical_kmeans(
    x: Tensor,
    k: int,
    *,
    iters: int = 15,
    init: Tensor | None = None,
    chunk_size: int = 65536,
    seed: int = 0,
    progress: bool = False,
    use_faiss: bool = False,
) -> KMeansResult:
    """Cluster the rows of x (N, F) (normalised on the fly) into k clusters on the unit sphere.

    ``init`` (k, F), e.g. the previous epoch's centroids, is a warm start: cluster j starts at
    init[j], so ids stay aligned. The objective never rises between iterations; stops early once
    no label changes. ``use_faiss`` hands the work to faiss (if importable) instead of torch.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"spherical_kmeans expects x of shape (N, F) with N >= 1, got {tuple(x.shape)}")
    if k < 1 or iters < 0 or chunk_size < 1:
        raise ValueError(f"need k >= 1, iters >= 0, chunk_size >= 1; got k={k}, iters={iters}, chunk_size={chunk_size}")
    if init is not None and tuple(init.shape) != (k, x.shape[1]):
        raise ValueError(f"init must have shape ({k}, {x.shape[1]}), got {tuple(init.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("spherical_kmeans: x contains non-finite values")
    if use_faiss:
        return _faiss_kmeans(x, k, iters=iters, init=init, seed=seed)

    with torch.no_grad():
        centroids = F.normalize(init.to(x.device).float(), dim=1) if init is not None else _random_init(x, k, seed)
        inertia: list[float] = []
        labels, best = _assign(x, centroids, chunk_size)
        inertia.append(_inertia(best))
        bar = tqdm(range(iters), desc="k-means", disable=not progress, leave=False)
        for _ in bar:
            centroids, _ = _update(x, labels, best, k, chunk_size)
            new_labels, best = _assign(x, centroids, chunk_size)
            inertia.append(_inertia(best))
            bar.set_postfix(inertia=f"{inertia[-1]:.1f}")
            converged = torch.equal(new_labels, labels)
            labels = new_labels
            if converged:
                break
        bar.close()
        sizes = torch.bincount(labels, minlength=k)
    return KMeansResult(centroids, labels, inertia, sizes)


def _faiss_kmeans(x: Tensor, k: int, *, iters: int, init: Tensor | None, seed: int) -> KMeansResult:
    """The same clustering through faiss (optional dependency; not installed by requirements.txt)."""
    try:
        import faiss
    except ImportError:
        raise ImportError("use_faiss=True needs the faiss package (faiss-cpu or faiss-gpu)") from None
    data = F.normalize(x.float(), dim=1).cpu().numpy()
    kmeans = faiss.Kmeans(data.shape[1], k, niter=iters, spherical=True, seed=seed,
                          gpu=x.is_cuda, verbose=False)
    start = None if init is None else F.normalize(init.float(), dim=1).cpu().numpy()
    kmeans.train(data, init_centroids=start)
    # Final assignment by our own chunked cosine argmax, whatever metric faiss's index uses.
    centroids = F.normalize(torch.from_numpy(kmeans.centroids).to(x.device), dim=1)
    labels, best = _assign(x, centroids, 65536)
    inertia = [_inertia(best)]
    return KMeansResult(centroids, labels, inertia, torch.bincount(labels, minlength=k))


@torch.no_grad()
def pair_features(encode_pairs, loader, device, autocast, progress: bool = True) -> Tensor:
    """The k-means input of §3.4: x = L2norm(v^I + w^I) of every pair of `loader` (no augmentation) from the
    momentum encoders (`encode_pairs`), in loader order, float32."""
    feats = []
    for batch in tqdm(loader, desc="k-means features", leave=False, disable=not progress):
        batch = {key: v.to(device, non_blocking=True) if hasattr(v, "to") else v for key, v in batch.items()}
        with autocast:
            feats.append(encode_pairs(batch["regions"], batch["region_lengths"], batch["input_ids"],
                                      batch["text_lengths"], batch.get("clip")).float())
    return torch.cat(feats)


def cluster_training_pairs(encode_pairs, dataset, *, k: int, iters: int, init: Tensor | None, chunk_size: int,
                           seed: int, batch_size: int, num_workers: int | str, device, autocast, world: int = 1,
                           rank: int = 0, progress: bool = True) -> tuple[Tensor, Tensor, KMeansResult | None]:
    """Online k-means of §3.4 over the training pairs: every rank encodes a contiguous share of `dataset`
    (no augmentation; `num_workers` as data.num_workers, "auto" included), the features are gathered in dataset
    order, rank 0 clusters them and broadcasts.

    Returns (labels by dataset index, centroids (k, F) zero-padded when there are fewer points than k, and
    rank 0's KMeansResult for logging; None elsewhere)."""
    bounds = [len(dataset) * r // world for r in range(world + 1)]
    share = Subset(dataset, range(bounds[rank], bounds[rank + 1]))
    loader = DataLoader(share, batch_size=batch_size, collate_fn=collate,
                        **loader_options(num_workers, torch.device(device).type))
    (x,) = dist.all_gather_rows(pair_features(encode_pairs, loader, device, autocast, progress and rank == 0))
    labels = torch.zeros(len(dataset), dtype=torch.long, device=device)
    centroids = torch.zeros(k, x.size(1), device=device)
    result = None
    if rank == 0:
        result = spherical_kmeans(x, min(k, x.size(0)), iters=iters, init=init, chunk_size=chunk_size, seed=seed,
                                  progress=progress)
        labels.copy_(result.labels)
        centroids[: result.centroids.size(0)].copy_(result.centroids)
    return dist.broadcast(labels), dist.broadcast(centroids), result
