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
from .errors import CoderError

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


def rank_block(emb: dict[str, Tensor], beta: float, first_image: int, n_images: int,
               captions_per_image: int = 5, chunk_size: int = 1000) -> dict:
    """Recalls of images [first_image, first_image + n_images) against their own captions."""
    images = slice(first_image, first_image + n_images)
    captions = slice(first_image * captions_per_image, (first_image + n_images) * captions_per_image)
    positives = fused_positives(emb, beta, captions, first_image, captions_per_image)
    i2t, t2i = ranks_from_chunks(fused_chunks(emb, beta, images, captions, chunk_size), positives, n_images,
                                 captions_per_image)
    result = recalls_from_ranks(i2t, t2i)
    result["chance_rsum"] = chance_rsum(n_images, captions_per_image)
    return result


def evaluate_embeddings(emb: dict[str, Tensor], beta: float = 0.9, captions_per_image: int = 5,
                        fold5: bool = False, chunk_size: int = 1000) -> dict:
    """The protocol's recalls: all images (1K or 5K), and with fold5 the 5-fold 1K average as the main row."""
    n_images = emb["v_i"].size(0)
    if "v_c" not in emb:
        beta = 1.0  # instance-only model
    full = rank_block(emb, beta, 0, n_images, captions_per_image, chunk_size)
    if not fold5:
        return full
    fold_size = n_images // 5
    folds = [rank_block(emb, beta, f * fold_size, fold_size, captions_per_image, chunk_size) for f in range(5)]
    result = average_recalls(folds)
    result["chance_rsum"] = folds[0]["chance_rsum"]
    result["folds"] = folds
    result["5k"] = full
    return result


def evaluate_model(model, images_ds, captions_ds, device, *, beta: float = 0.9, fold5: bool = False,
                   captions_per_image: int = 5, batch_size: int = 256, chunk_size: int = 1000,
                   num_workers: int = 0, progress: bool = True, branches: bool = False, amp: bool = False,
                   eccv: bool = False, beta_grid: Sequence[float] = ()) -> dict:
    """Encode a split and rank it. With `branches`, concept models also get instance-only and
    concept-only rows (keys `instance`, `concept`); with `eccv` (COCO testall only), ECCV Caption and CxC
    metrics (key `eccv`). With `beta_grid` (concept models), the fusion weight is the grid's value of highest
    R@sum on this split (use it on dev only), stored as `beta`. Non-finite embeddings raise
    `NonFiniteScoresError`."""
    t0 = time.perf_counter()
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
    captions = PrecompCaptions(data["root"], split, tokenizer, max_words=data["max_words"],
                               captions_per_image=data["captions_per_image"], max_captions=cap)
    return images, captions


def evaluate_split(model, cfg: dict, tokenizer, split: str, device, progress: bool = True,
                   fold5: bool | None = None, branches: bool = True, eccv: bool = False,
                   beta: float | None = None, select_beta: bool = False) -> dict:
    """The dataset's protocol on a split, as in training's dev evaluation and at test time: COCO testall gets
    5-fold 1K (averaged) and 5K; otherwise all images. The same call serves `train.py` and `evaluate.py`, so
    both report the same numbers for the same checkpoint."""
    images, captions = split_datasets(cfg, tokenizer, split)
    ecfg = cfg["eval"]
    if fold5 is None:
        fold5 = cfg["data"]["dataset"] == "coco" and ecfg["fold5"] and len(images) >= 5000
    elif fold5 and len(images) != 5000:
        raise EvaluationError(f"--fold5 is COCO's protocol (five 1K folds of the 5,000 testall images); split "
                              f"'{split}' of {cfg['data']['root']} has {len(images)} images")
    if eccv:
        from .eccv import require_coco_5k  # imported here: coder.eccv imports this module
        require_coco_5k(len(images), len(captions), cfg["data"]["captions_per_image"])  # before encoding
    result = evaluate_model(model, images, captions, device, beta=ecfg["beta"] if beta is None else beta, fold5=fold5,
                            captions_per_image=cfg["data"]["captions_per_image"], batch_size=ecfg["batch_size"],
                            chunk_size=ecfg["chunk_size"], progress=progress, branches=branches, amp=ecfg["amp"],
                            eccv=eccv, beta_grid=ecfg["beta_grid"] if select_beta else ())
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
