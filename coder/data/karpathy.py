"""Karpathy's split files (`dataset_flickr30k.json`, `dataset_coco.json`) read into the precomp layout's splits.

The files (Karpathy and Fei-Fei, "Deep Visual-Semantic Alignments", CVPR 2015) hold
`{"images": [{"split": ..., "filename": ..., "sentences": [{"raw": ...}, ...], ...}]}` with `imgid` (an index)
on every entry and `filepath` plus `cocoid` on COCO's. The precomp layout of SCAN / VSE-infinity names the
splits train / dev / test (Flickr30K) and train / dev / testall (COCO, whose train includes Karpathy's
`restval`), 5 captions per image, consecutive; the converters write them in the JSON's order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .precomp import DataError

CAPTIONS_PER_IMAGE = 5
SPLITS = {"f30k": {"train": "train", "val": "dev", "test": "test"},
          "coco": {"train": "train", "restval": "train", "val": "dev", "test": "testall"}}
ID_FIELDS = ("auto", "cocoid", "imgid", "filename")


@dataclass(frozen=True)
class KarpathyImage:
    image_id: str  # the id the detector's TSV and S_ids.txt use
    path: str  # image file relative to the image root (COCO: "val2014/COCO_val2014_....jpg")
    captions: tuple[str, ...]


def _image_id(entry: dict, field: str, where: str) -> str:
    if field == "filename":
        stem = Path(str(entry.get("filename", ""))).stem
        if not stem:
            raise DataError(f"{where}: no 'filename'")
        return str(int(stem)) if stem.isdigit() else stem  # Flickr30K: "1000092795.jpg" -> 1000092795
    if field not in entry:
        raise DataError(f"{where}: no '{field}' (choose the id with --id-field)")
    return str(entry[field])


def read_karpathy(path: str | Path, dataset: str = "auto", id_field: str = "auto",
                  ) -> tuple[str, dict[str, list[KarpathyImage]]]:
    """(dataset, {precomp split: images in the JSON's order}); every problem a DataError naming the entry."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: Karpathy split file not found (dataset_flickr30k.json or dataset_coco.json)")
    try:
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a Karpathy split file ({type(err).__name__}: {err}); expected "
                        f"{{\"images\": [...]}}") from err
    if not isinstance(images, list) or not images:
        raise DataError(f"{path}: 'images' is not a non-empty list")
    if dataset == "auto":
        dataset = "coco" if any(isinstance(e, dict) and "cocoid" in e for e in images[:10]) else "f30k"
    if dataset not in SPLITS:
        raise ValueError(f"dataset must be 'auto' or one of {sorted(SPLITS)}, got {dataset!r}")
    if id_field == "auto":
        id_field = "cocoid" if dataset == "coco" else "filename"
    if id_field not in ID_FIELDS:
        raise ValueError(f"id_field must be one of {ID_FIELDS}, got {id_field!r}")
    splits: dict[str, list[KarpathyImage]] = {}
    seen: dict[str, int] = {}
    for i, entry in enumerate(images):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or "split" not in entry:
            raise DataError(f"{where}: not an object with a 'split'")
        split = SPLITS[dataset].get(entry["split"])
        if split is None:
            raise DataError(f"{where}: split {entry['split']!r} is none of {sorted(SPLITS[dataset])} "
                            f"({dataset}; is this the other data set's file?)")
        image_id = _image_id(entry, id_field, where)
        if image_id in seen:
            raise DataError(f"{where}: id {image_id} (--id-field {id_field}) also at images[{seen[image_id]}]")
        seen[image_id] = i
        raw = [" ".join(str(s.get("raw", "")).split()) for s in entry.get("sentences", []) if isinstance(s, dict)]
        raw = [c for c in raw if c]
        if len(raw) < CAPTIONS_PER_IMAGE:  # COCO has images with 6 or 7: the first 5 are kept, as in SCAN's files
            raise DataError(f"{where} (id {image_id}): {len(raw)} non-empty 'raw' sentences, need "
                            f"{CAPTIONS_PER_IMAGE}")
        rel = str(Path(entry.get("filepath", "")) / str(entry.get("filename", "")))
        splits.setdefault(split, []).append(KarpathyImage(image_id, rel, tuple(raw[:CAPTIONS_PER_IMAGE])))
    return dataset, splits


def write_text_files(out: str | Path, split: str, images: list[KarpathyImage]) -> None:
    """`S_caps.txt` (5 lines per image) and `S_ids.txt` (one id per image row) of one split."""
    out = Path(out)
    (out / f"{split}_caps.txt").write_text("".join(c + "\n" for im in images for c in im.captions), encoding="utf-8")
    (out / f"{split}_ids.txt").write_text("".join(im.image_id + "\n" for im in images), encoding="utf-8")
