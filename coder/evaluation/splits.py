"""A split evaluated end to end: encode it once, rank it by the dataset's protocol (and ECCV Caption on
request), as training's dev evaluation and `evaluate.py` both do, so they report the same numbers."""
from __future__ import annotations

import time
from typing import Sequence

from torch import Tensor

from .eccv import eccv_metrics, require_coco_5k
from .encode import encode_split, split_datasets
from .protocols import evaluate_embeddings, on_device, protocol_fold5
from .ranking import check_finite, duplicate_captions


def evaluate_model(model, images_ds, captions_ds, device, *, beta: float = 0.9, fold5: bool = False,
                   captions_per_image: int = 5, batch_size: int = 256, chunk_size: int = 1000,
                   num_workers: int | str = 0, progress: bool = True, branches: bool = False, amp: bool = False,
                   eccv: bool = False, beta_grid: Sequence[float] = (), emb: dict[str, Tensor] | None = None) -> dict:
    """Encode a split (unless `emb` holds its embeddings already) and rank it on `device`. With `branches`,
    concept models also get instance-only and concept-only rows (keys `instance`, `concept`); with `eccv` (COCO
    testall only), ECCV Caption and CxC metrics (key `eccv`). With `beta_grid` (concept models), the fusion
    weight is the grid's value of highest R@sum on this split (use it on dev only), stored as `beta`.
    Non-finite embeddings raise `NonFiniteScoresError`."""
    t0 = time.perf_counter()
    if emb is None:
        emb = encode_split(model, images_ds, captions_ds, device, batch_size, num_workers, progress, amp)
    emb = on_device(emb, device)
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
        result["eccv"] = eccv_metrics(emb, beta, captions_per_image, chunk_size)
    n_pairs = emb["v_i"].size(0) * emb["w_i"].size(0)
    result["timing"] = {"encode_s": t1 - t0, "rank_s": t2 - t1, "kpps": n_pairs / max(t2 - t1, 1e-9) / 1e3}
    return result


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
        require_coco_5k(len(images), len(captions), cfg["data"]["captions_per_image"])  # before encoding
    result = evaluate_model(model, images, captions, device, beta=ecfg["beta"] if beta is None else beta, fold5=fold5,
                            captions_per_image=cfg["data"]["captions_per_image"], batch_size=ecfg["batch_size"],
                            chunk_size=ecfg["chunk_size"], num_workers=cfg["data"]["num_workers"],
                            progress=progress, branches=branches, amp=ecfg["amp"], eccv=eccv,
                            beta_grid=ecfg["beta_grid"] if select_beta else (), emb=emb)
    result["split"], result["dataset"] = split, cfg["data"]["dataset"]
    texts = getattr(getattr(captions, "files", None), "captions", None)
    if texts is not None:
        result["duplicate_captions"] = duplicate_captions(list(texts), cfg["data"]["captions_per_image"])
    return result
