"""ECCV Caption and CxC metrics for COCO's 5K test split, next to R@K (Chun et al., ECCV 2022).

COCO's 5K test has many true matches its labels miss; ECCV Caption adds machine-and-human verified
positives and reports mAP@R, R-Precision and R@1 on them, and CxC adds caption-image similarity labels.
The `eccv-caption` package (MIT) ships both annotation maps and `coco_test_ids.npy`, the 25,000 COCO
caption ids in the Karpathy test order, which is the row order of coco_precomp's `testall_caps.txt`;
its caption-to-image map gives each image row's COCO id. Everything runs offline.

We rank top-K lists from the fused similarities (§3.5) in chunks, as the other protocols do, and hand them to
the package. PMRP needs plausible-match files the package does not ship, so it is left out.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import EccvSplitError
from .ranking import fused_chunks

COCO_TEST_CAPTIONS = 25_000
METRICS = ("eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_recalls", "coco_5k_recalls")


def _eccv_caption():
    """The `eccv-caption` package, imported on first use (only --eccv needs it, and it reads its annotation
    maps on import)."""
    try:
        import eccv_caption
    except ImportError as err:  # a requirement; the message says how to get it
        raise ImportError("ECCV Caption metrics need the 'eccv-caption' package: pip install eccv-caption") from err
    return eccv_caption


def _package_dir() -> Path:
    return Path(_eccv_caption().__file__).parent / "data"


def coco_test_ids(captions_per_image: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(image ids per row, caption ids per line) of coco_precomp's testall split, from the package's maps."""
    data = _package_dir()
    caption_ids = np.load(data / "coco_test_ids.npy").astype(np.int64)
    caption_to_image = json.loads((data / "original_caption_to_image.json").read_text())
    images = np.array([caption_to_image[str(c)][0] for c in caption_ids], dtype=np.int64)
    grouped = images.reshape(-1, captions_per_image)
    if not (grouped == grouped[:, :1]).all():
        raise ValueError("eccv-caption's coco_test_ids.npy does not hold 5 consecutive captions per image")
    return grouped[:, 0], caption_ids


def top_k(emb: dict[str, Tensor], beta: float, k_i2t: int, k_t2i: int, chunk_size: int = 1000
          ) -> tuple[Tensor, Tensor]:
    """Indices of the k best captions per image (n_images, k_i2t) and of the k best images per caption
    (n_captions, k_t2i), best first, from chunks of the fused similarity (never the whole matrix), ranked where
    the embeddings lie; the lists come back on the CPU."""
    n_images, n_captions, device = emb["v_i"].size(0), emb["w_i"].size(0), emb["v_i"].device
    i2t = torch.empty(n_images, min(k_i2t, n_captions), dtype=torch.long, device=device)
    best_scores = torch.full((n_captions, 0), float("-inf"), device=device)
    best_images = torch.empty(n_captions, 0, dtype=torch.long, device=device)
    for start, rows in fused_chunks(emb, beta, slice(0, n_images), slice(0, n_captions), chunk_size):
        rows = rows.float()
        i2t[start:start + rows.size(0)] = rows.topk(i2t.size(1), dim=1).indices
        scores = torch.cat([best_scores, rows.t()], dim=1)  # running top-k over image chunks
        chunk_images = torch.arange(start, start + rows.size(0), device=device).expand(n_captions, -1)
        images = torch.cat([best_images, chunk_images], dim=1)
        keep = scores.topk(min(k_t2i, scores.size(1)), dim=1)
        best_scores, best_images = keep.values, images.gather(1, keep.indices)
    return i2t.cpu(), best_images.cpu()


def metrics_from_top_k(i2t: Tensor, t2i: Tensor, image_ids: np.ndarray, caption_ids: np.ndarray) -> dict:
    """ECCV Caption mAP@R / R-Precision / R@1, CxC R@1/5/10 and COCO 5K R@1/5/10 (percent), per direction."""
    i2t_items = {int(image_ids[i]): caption_ids[row].tolist() for i, row in enumerate(i2t.numpy())}
    t2i_items = {int(caption_ids[j]): image_ids[row].tolist() for j, row in enumerate(t2i.numpy())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns when the optional ujson is missing
        scores = _eccv_caption().Metrics().compute_all_metrics(i2t_items, t2i_items, target_metrics=METRICS,
                                                               Ks=(1, 5, 10), verbose=False)
    return {name: {d: 100.0 * float(v) for d, v in value.items()} for name, value in scores.items()}


def needed_k() -> tuple[int, int]:
    """List lengths that cover mAP@R (R = the largest positive set) and R@10, per direction."""
    data = _package_dir()
    i2t = json.loads((data / "eccv_image_to_caption.json").read_text())
    t2i = json.loads((data / "eccv_caption_to_image.json").read_text())
    return max(10, max(map(len, i2t.values()))), max(10, max(map(len, t2i.values())))


def require_coco_5k(n_images: int, n_captions: int, captions_per_image: int = 5) -> None:
    """ECCV Caption's annotations cover COCO testall alone: refuse any other split (before encoding it)."""
    if n_captions != COCO_TEST_CAPTIONS or n_images * captions_per_image != n_captions:
        raise EccvSplitError(f"ECCV Caption metrics need COCO's 5K test split (testall: 5,000 images, 25,000 "
                             f"captions in the Karpathy order), got {n_images} images and {n_captions} captions")


def eccv_metrics(emb: dict[str, Tensor], beta: float = 0.9, captions_per_image: int = 5,
                 chunk_size: int = 1000) -> dict:
    """ECCV Caption and CxC metrics of COCO testall embeddings (5,000 images, 25,000 captions in order)."""
    require_coco_5k(emb["v_i"].size(0), emb["w_i"].size(0), captions_per_image)
    if "v_c" not in emb:
        beta = 1.0
    image_ids, caption_ids = coco_test_ids(captions_per_image)
    i2t, t2i = top_k(emb, beta, *needed_k(), chunk_size=chunk_size)
    return metrics_from_top_k(i2t, t2i, image_ids, caption_ids)
