"""Encoding a split once (CODER §3.5: every image and caption embedded once, then ranked): the datasets of a
split, and their embeddings in dataset order, fed by DataLoader workers as training's loader is."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import PrecompCaptions, PrecompImages, collate
from ..data.checks import check_regions
from ..data.workers import loader_options
from .ranking import check_finite


def _loader(dataset, batch_size: int, num_workers: int | str, device_type: str, order=None) -> DataLoader:
    """Batches in dataset order (or `order`), with `data.num_workers` workers as training resolves them and
    page-locked batches on CUDA."""
    return DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=collate,
                      **loader_options(num_workers, device_type))


def _autocast(device, amp: bool):
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


@torch.no_grad()
def encode_split(model, images_ds, captions_ds, device, batch_size: int = 256, num_workers: int | str = 0,
                 progress: bool = True, amp: bool = False) -> dict[str, Tensor]:
    """Embeddings of every image (once) and every caption, in dataset order, on the CPU, in float32.

    Captions are batched in order of length so padding is minimal; the output is put back in order.
    `num_workers`: DataLoader workers, an int or "auto" (`data.num_workers`). `amp` encodes under bf16
    autocast on CUDA (faster; ranks may then tie more often): off by default.
    """
    model.eval()
    device_type = torch.device(device).type
    out: dict[str, list] = {}
    for batch in tqdm(_loader(images_ds, batch_size, num_workers, device_type), desc="encode images",
                      leave=False, disable=not progress):
        clip = batch["clip"].to(device, non_blocking=True) if "clip" in batch else None
        with _autocast(device, amp):
            emb = model.encode_image(batch["regions"].to(device, non_blocking=True),
                                     batch["region_lengths"].to(device), clip)
        for key, value in emb.items():
            out.setdefault(key, []).append(value.float().cpu())
    words = getattr(getattr(captions_ds, "files", None), "captions", None)  # length proxy: word count
    order = np.argsort([len(c.split()) for c in words], kind="stable").tolist() if words else None
    for batch in tqdm(_loader(captions_ds, batch_size, num_workers, device_type, order), desc="encode captions",
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


def encode_datasets(model, cfg: dict, images, captions, device, progress: bool = True) -> dict[str, Tensor]:
    """A split's embeddings with the config's eval.batch_size, eval.amp and data.num_workers (checked finite)."""
    emb = encode_split(model, images, captions, device, cfg["eval"]["batch_size"], cfg["data"]["num_workers"],
                       progress, cfg["eval"]["amp"])
    check_finite(emb)
    return emb


def encode_for_split(model, cfg: dict, tokenizer, split: str, device, progress: bool = True) -> dict[str, Tensor]:
    """The split's embeddings as `evaluate_split` encodes them (checked finite)."""
    images, captions = split_datasets(cfg, tokenizer, split)
    return encode_datasets(model, cfg, images, captions, device, progress)
