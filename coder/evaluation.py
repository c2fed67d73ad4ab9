"""Retrieval evaluation (CODER §3.5, §4.1): encode once, rank in chunks, R@K / medr / meanr / R@sum.

Usable on its own: `compute_recalls(sims)` takes any (n_images, 5 * n_images) similarity matrix;
`evaluate_model(...)` encodes a split with a model and applies the dataset's protocol (F30K 1K test;
COCO testall 5-fold 1K averaged, and 5K).

Ties count against the model: a rank counts every other candidate scored >= the positive, so a collapsed
model (all scores equal) gets R@sum 0, never 600. Non-finite scores are an error, never a result. Ranking
runs in float32 at least, whatever precision the encoders used.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import PrecompCaptions, PrecompImages, collate
from .data.checks import check_regions
from .errors import CoderError
from .stats import bootstrap_means, percentile_interval

RECALL_KS = (1, 5, 10)


class EvaluationError(CoderError, ValueError):
    """An evaluation protocol asked of a split it does not fit."""


class NonFiniteScoresError(CoderError, ValueError):
    """Embeddings or similarities hold NaN/inf: a diverged model has no recall to report."""


def _metrics(ranks: Tensor) -> dict[str, float]:
    ranks = ranks.double()
    out = {f"r{k}": 100.0 * float((ranks < k).double().mean()) for k in RECALL_KS}
    out["medr"] = float(np.floor(np.median(ranks.numpy())) + 1)
    out["meanr"] = float(ranks.mean()) + 1.0
    return out


def ranks_from_chunks(chunks: Iterable[tuple[int, Tensor]], positives: Tensor, n_images: int,
                      captions_per_image: int = 5) -> tuple[Tensor, Tensor]:
    """0-based ranks from row chunks (first image index, sims of those images to all captions).

    i2t rank of an image = number of other images' captions scored >= its best caption;
    t2i rank of a caption = number of other images scored >= its own image (`positives[j]`).
    Ties count against the model (pessimistic). Only one chunk is ever held, so memory is bounded by the
    chunk size. Scores must be finite (see `check_finite`).
    """
    n_captions = n_images * captions_per_image
    i2t = torch.empty(n_images, dtype=torch.long)
    t2i = torch.zeros(n_captions, dtype=torch.long)
    caption_image = torch.arange(n_captions) // captions_per_image
    for start, rows in chunks:
        rows = rows.float().cpu()
        images = torch.arange(start, start + rows.size(0))
        own = caption_image[None, :] == images[:, None]  # (chunk, n_captions): the image's own captions
        best_own = rows.masked_fill(~own, float("-inf")).amax(dim=1)
        i2t[images] = ((rows >= best_own[:, None]) & ~own).sum(dim=1)
        t2i += ((rows >= positives.float()[None, :]) & ~own).sum(dim=0)
    return i2t, t2i


def _as_tensor(sims) -> Tensor:
    return torch.as_tensor(np.asarray(sims)) if not isinstance(sims, Tensor) else sims.detach().cpu()


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
    captions = torch.arange(sims.size(1))
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
        bad = torch.zeros(rows[0].size(0), dtype=torch.bool)
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


def recalls_from_ranks(i2t: Tensor, t2i: Tensor) -> dict:
    out = {"i2t": _metrics(i2t), "t2i": _metrics(t2i)}
    out["rsum"] = sum(out[d][f"r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return out


def average_recalls(results: list[dict]) -> dict:
    """Every metric, R@sum included, averaged over folds in order (COCO 5-fold 1K)."""
    avg = {d: {m: float(np.mean([r[d][m] for r in results])) for m in results[0][d]} for d in ("i2t", "t2i")}
    avg["rsum"] = float(np.mean([r["rsum"] for r in results]))
    return avg


# ---------------------------------------------------------------------------------------------- encoding
def _loader(dataset, batch_size: int, num_workers: int = 0, order=None) -> DataLoader:
    sampler = order if order is not None else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def encode_split(model, images_ds, captions_ds, device, batch_size: int = 256, num_workers: int = 0,
                 progress: bool = True, amp: bool = False) -> dict[str, Tensor]:
    """Embeddings of every image (once) and every caption, in dataset order, on the CPU, in float32.

    Captions are batched in order of length so padding is minimal; the output is put back in order.
    `amp` encodes under bf16 autocast on CUDA (faster; ranks may then tie more often): off by default.
    """
    model.eval()
    out: dict[str, list] = {}
    for batch in tqdm(_loader(images_ds, batch_size, num_workers), desc="encode images", leave=False,
                      disable=not progress):
        clip = batch["clip"].to(device, non_blocking=True) if "clip" in batch else None
        with _autocast(device, amp):
            emb = model.encode_image(batch["regions"].to(device, non_blocking=True),
                                     batch["region_lengths"].to(device), clip)
        for key, value in emb.items():
            out.setdefault(key, []).append(value.float().cpu())
    words = getattr(getattr(captions_ds, "files", None), "captions", None)  # length proxy: word count
    order = np.argsort([len(c.split()) for c in words], kind="stable").tolist() if words else None
    for batch in tqdm(_loader(captions_ds, batch_size, num_workers, order), desc="encode captions",
                      leave=False, disable=not progress):
        with _autocast(device, amp):
            emb = model.encode_text(batch["input_ids"].to(device, non_blocking=True),
                                    batch["text_lengths"].to(device))
        for key, value in emb.items():
            out.setdefault(key, []).append(value.float().cpu())
    result = {key: torch.cat(value) for key, value in out.items()}
    if order is not None:
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.as_tensor(order)] = torch.arange(len(order))
        for key in ("w_i", "w_c"):
            if key in result:
                result[key] = result[key][inverse]
    return result


def _autocast(device, amp: bool):
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


# ---------------------------------------------------------------------------------------------- ranking
def fused_chunks(emb: dict[str, Tensor], beta: float, image_slice: slice, caption_slice: slice,
                 chunk_size: int) -> Iterator[tuple[int, Tensor]]:
    """S = beta cos(v^I, w^I) + (1 - beta) cos(v^C, w^C) (§3.5), one block of images at a time."""
    start, stop = image_slice.start, image_slice.stop
    w_i = emb["w_i"][caption_slice]
    w_c = emb["w_c"][caption_slice] if "w_c" in emb and beta < 1 else None
    for s in range(start, stop, chunk_size):
        e = min(s + chunk_size, stop)
        rows = emb["v_i"][s:e] @ w_i.t() if beta > 0 else 0.0
        if w_c is not None:
            rows = beta * rows + (1 - beta) * (emb["v_c"][s:e] @ w_c.t())
        yield s - start, rows


def fused_positives(emb: dict[str, Tensor], beta: float, caption_slice: slice, image_start: int,
                    captions_per_image: int) -> Tensor:
    captions = torch.arange(caption_slice.start, caption_slice.stop)
    images = captions // captions_per_image
    pos = (emb["v_i"][images] * emb["w_i"][captions]).sum(-1) if beta > 0 else 0.0
    if "w_c" in emb and beta < 1:
        pos = beta * pos + (1 - beta) * (emb["v_c"][images] * emb["w_c"][captions]).sum(-1)
    return pos


Member = tuple[dict[str, Tensor], float]  # one model's embeddings of a split and its own fusion weight


def member(emb: dict[str, Tensor], beta: float) -> Member:
    """(emb, beta) with beta = 1 for an instance-only model (no concept embeddings)."""
    return emb, beta if "v_c" in emb else 1.0


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
    positives = sum(fused_positives(emb, beta, captions, first_image, captions_per_image)
                    for emb, beta in members) / len(members)
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


# ---------------------------------------------------------------------------------------------- evidence
COMPARED = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_KS) + ("rsum",)


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


def hit_differences(ranks_a: tuple[Tensor, Tensor], ranks_b: tuple[Tensor, Tensor],
                    captions_per_image: int = 5) -> np.ndarray:
    """(n_images, 6): per test image, 100 x (hit of a - hit of b), hit = rank < K, for i2t R@1/5/10 (the
    image as query) and t2i R@1/5/10 (averaged over its captions). Column means are the ΔR@K exactly."""
    columns = []
    for side, (a, b) in enumerate(zip(ranks_a, ranks_b)):
        for k in RECALL_KS:
            diff = (a < k).double() - (b < k).double()
            columns.append(100.0 * (diff.view(-1, captions_per_image).mean(1) if side else diff))
    return torch.stack(columns, dim=1).numpy()


def paired_bootstrap(ranks_a: tuple[Tensor, Tensor], ranks_b: tuple[Tensor, Tensor], captions_per_image: int = 5,
                     resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """ΔR@K and ΔR@sum (a - b) with percentile intervals from resampling the test images with replacement,
    each with its captions, so i2t and t2i (whose queries of one image share one target) move together."""
    values = hit_differences(ranks_a, ranks_b, captions_per_image)
    samples = bootstrap_means(values, resamples, seed)
    samples = np.column_stack([samples, samples.sum(axis=1)])  # R@sum = the sum of the six R@K
    observed = np.append(values.mean(axis=0), values.mean(axis=0).sum())
    low, high = percentile_interval(samples, level)
    return {name: {"delta": float(o), "low": float(lo), "high": float(hi)}
            for name, o, lo, hi in zip(COMPARED, observed, low, high)}


def check_resamples(resamples: int) -> None:
    if resamples < 1000:
        raise EvaluationError(f"--resamples {resamples}: take at least 1000, or the 2.5% and 97.5% percentiles "
                              "are themselves noisy")


def compare_members(members_a: Sequence[Member], members_b: Sequence[Member], captions_per_image: int = 5,
                    fold5: bool = False, chunk_size: int = 1000, resamples: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Paired bootstrap of a against b (each one model or an ensemble) on the same split, per protocol row."""
    shapes = [(m[0][0]["v_i"].size(0), m[0][0]["w_i"].size(0)) for m in (members_a, members_b)]
    if shapes[0] != shapes[1]:
        raise EvaluationError(f"--compare needs the same split for both models: {shapes[0][0]} images / "
                              f"{shapes[0][1]} captions against {shapes[1][0]} / {shapes[1][1]}")
    check_resamples(resamples)
    ranks_a = protocol_ranks(members_a, captions_per_image, fold5, chunk_size)
    ranks_b = protocol_ranks(members_b, captions_per_image, fold5, chunk_size)
    rows = {row: paired_bootstrap(ranks_a[row], ranks_b[row], captions_per_image, resamples, seed, level)
            for row in ranks_a}
    return {"resamples": resamples, "seed": seed, "level": level, "unit": "test image with its captions", **rows}


def format_comparison(compare: dict, name_a: str, name_b: str) -> str:
    """Δ = a - b per metric with its bootstrap interval, one protocol row after another."""
    lines = [f"Δ = {name_a} - {name_b}: paired bootstrap over the test images ({compare['resamples']} resamples, "
             f"seed {compare['seed']}), {100 * compare['level']:.0f}% percentile intervals (test-set noise only)"]
    for row in ("main", "5k"):
        if row in compare:
            cells = [f"{name.replace('_r', '@')} {c['delta']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]"
                     for name, c in compare[row].items()]
            lines.append(f"{'5K' if row == '5k' else 'main'}: " + "; ".join(cells))
    return "\n".join(lines)


def evaluate_model(model, images_ds, captions_ds, device, *, beta: float = 0.9, fold5: bool = False,
                   captions_per_image: int = 5, batch_size: int = 256, chunk_size: int = 1000,
                   num_workers: int = 0, progress: bool = True, branches: bool = False, amp: bool = False,
                   eccv: bool = False, beta_grid: Sequence[float] = (), emb: dict[str, Tensor] | None = None) -> dict:
    """Encode a split (unless `emb` holds its embeddings already) and rank it. With `branches`, concept models
    also get instance-only and concept-only rows (keys `instance`, `concept`); with `eccv` (COCO testall only),
    ECCV Caption and CxC metrics (key `eccv`). With `beta_grid` (concept models), the fusion weight is the
    grid's value of highest R@sum on this split (use it on dev only), stored as `beta`. Non-finite embeddings
    raise `NonFiniteScoresError`."""
    t0 = time.perf_counter()
    if emb is None:
        emb = encode_split(model, images_ds, captions_ds, device, batch_size, num_workers, progress, amp)
    check_finite(emb)
    t1 = time.perf_counter()
    if beta_grid and "v_c" in emb:  # the first best in grid order; its ranking is the result
        tried = [evaluate_embeddings(emb, b, captions_per_image, fold5, chunk_size) for b in beta_grid]
        best = max(range(len(tried)), key=lambda i: (tried[i]["rsum"], -i))
        beta, result = beta_grid[best], tried[best]
    else:
        result = evaluate_embeddings(emb, beta, captions_per_image, fold5, chunk_size)
    result["beta"] = beta if "v_c" in emb else 1.0
    t2 = time.perf_counter()
    if branches and "v_c" in emb:
        result["instance"] = evaluate_embeddings(emb, 1.0, captions_per_image, fold5, chunk_size)
        result["concept"] = evaluate_embeddings(emb, 0.0, captions_per_image, fold5, chunk_size)
    if eccv:
        from .eccv import eccv_metrics  # imported here: coder.eccv imports this module

        result["eccv"] = eccv_metrics(emb, beta, captions_per_image, chunk_size)
    n_pairs = emb["v_i"].size(0) * emb["w_i"].size(0)
    result["timing"] = {"encode_s": t1 - t0, "rank_s": t2 - t1, "kpps": n_pairs / max(t2 - t1, 1e-9) / 1e3}
    return result


def format_row(result: dict, label: str = "") -> str:
    """One line in the layout of the paper's Table 1: text retrieval R@1/5/10, image retrieval R@1/5/10, R@sum."""
    i2t, t2i = result["i2t"], result["t2i"]
    cells = [i2t["r1"], i2t["r5"], i2t["r10"], t2i["r1"], t2i["r5"], t2i["r10"], result["rsum"]]
    return f"{label:<14}" + " ".join(f"{c:7.1f}" for c in cells)


TABLE_HEADER = f"{'':<14}" + " ".join(f"{h:>7}" for h in ("i2t@1", "i2t@5", "i2t@10", "t2i@1", "t2i@5", "t2i@10",
                                                             "R@sum"))


def format_table(result: dict) -> str:
    """Table-1 rows: the main protocol row, plus COCO 5K and the branch rows when present."""
    lines = [TABLE_HEADER, format_row(result, "1K (5-fold)" if "folds" in result else "fused" if "instance"
                                      in result else "all")]
    if "5k" in result:
        lines.append(format_row(result["5k"], "5K"))
    if "ensemble" in result:  # never to pass as a single model: every row says what it is
        n = len(result["ensemble"])
        lines = [f"ensemble of {n} (similarities averaged{', 1K rows: 5-fold' if 'folds' in result else ''}): "
                 + ", ".join(result["ensemble"]), TABLE_HEADER, format_row(result, f"ensemble of {n}")]
        if "5k" in result:
            lines.append(format_row(result["5k"], f"ens. of {n} 5K"))
    for branch in ("instance", "concept"):
        if branch in result:
            lines.append(format_row(result[branch], branch + "-only"))
    if "chance_rsum" in result:
        chance = f"chance R@sum {result['chance_rsum']:.1f}"
        if "5k" in result:
            chance += f" (5K: {result['5k']['chance_rsum']:.1f})"
        lines.append(chance + "; ties count against the model")
    if "duplicate_captions" in result:
        lines.append(f"{result['duplicate_captions']} captions are verbatim equal to another image's caption")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- protocol
def split_datasets(cfg: dict, tokenizer, split: str):
    """(images, captions) datasets of a split; the validation split is capped to `data.val_max_captions`."""
    data = cfg["data"]
    cap = data["val_max_captions"] if split == data["val_split"] else None
    images = PrecompImages(data["root"], split, captions_per_image=data["captions_per_image"],
                           max_captions=cap, load_clip=data["clip_features"], clip_dim=cfg["model"]["user"]["clip_dim"])
    check_regions(cfg, images.files.ims_path, images.num_regions, images.region_dim)  # before any encoding
    captions = PrecompCaptions(data["root"], split, tokenizer, max_words=data["max_words"],
                               captions_per_image=data["captions_per_image"], max_captions=cap)
    return images, captions


def protocol_fold5(cfg: dict, split: str, n_images: int, fold5: bool | None = None) -> bool:
    """COCO testall gets 5-fold 1K (averaged) and 5K unless asked otherwise; --fold5 needs 5,000 images."""
    if fold5 is None:
        return cfg["data"]["dataset"] == "coco" and cfg["eval"]["fold5"] and n_images >= 5000
    if fold5 and n_images != 5000:
        raise EvaluationError(f"--fold5 is COCO's protocol (five 1K folds of the 5,000 testall images); split "
                              f"'{split}' of {cfg['data']['root']} has {n_images} images")
    return fold5


def encode_for_split(model, cfg: dict, tokenizer, split: str, device, progress: bool = True) -> dict[str, Tensor]:
    """The split's embeddings as `evaluate_split` encodes them (checked finite)."""
    images, captions = split_datasets(cfg, tokenizer, split)
    emb = encode_split(model, images, captions, device, cfg["eval"]["batch_size"], 0, progress, cfg["eval"]["amp"])
    check_finite(emb)
    return emb


def evaluate_split(model, cfg: dict, tokenizer, split: str, device, progress: bool = True,
                   fold5: bool | None = None, branches: bool = True, eccv: bool = False,
                   beta: float | None = None, select_beta: bool = False, emb: dict[str, Tensor] | None = None) -> dict:
    """The dataset's protocol on a split, as in training's dev evaluation and at test time: COCO testall gets
    5-fold 1K (averaged) and 5K; otherwise all images. The same call serves `train.py` and `evaluate.py`, so
    both report the same numbers for the same checkpoint. `emb`: the split's embeddings from
    `encode_for_split`, when already encoded."""
    images, captions = split_datasets(cfg, tokenizer, split)
    ecfg = cfg["eval"]
    fold5 = protocol_fold5(cfg, split, len(images), fold5)
    if eccv:
        from .eccv import require_coco_5k  # imported here: coder.eccv imports this module
        require_coco_5k(len(images), len(captions), cfg["data"]["captions_per_image"])  # before encoding
    result = evaluate_model(model, images, captions, device, beta=ecfg["beta"] if beta is None else beta, fold5=fold5,
                            captions_per_image=cfg["data"]["captions_per_image"], batch_size=ecfg["batch_size"],
                            chunk_size=ecfg["chunk_size"], progress=progress, branches=branches, amp=ecfg["amp"],
                            eccv=eccv, beta_grid=ecfg["beta_grid"] if select_beta else (), emb=emb)
    result["split"], result["dataset"] = split, cfg["data"]["dataset"]
    texts = getattr(getattr(captions, "files", None), "captions", None)
    if texts is not None:
        result["duplicate_captions"] = duplicate_captions(list(texts), cfg["data"]["captions_per_image"])
    return result


def write_json(path: Path, obj: dict) -> None:
    """Atomic write: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
