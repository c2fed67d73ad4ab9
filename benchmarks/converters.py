"""Throughput of the two precomp converters on this machine, on generated inputs of the real shapes.

- scripts/convert_butd_tsv.py's `convert_butd_tsv`: a synthetic detector TSV of `--tsv-rows` images, 36 boxes x
  2,048 float32 features each (about 390 KB of base64 a row, as the real files), every row in the split file;
  rows/s and TSV MB/s, from a file in the page cache (the first read of a real TSV is disk-bound).
- scripts/extract_grid_features.py's `extract_grid_features`: `--images` generated 500 x 375 JPEGs (Flickr30K's
  and COCO's typical size) through a random-init ResNet (the same arithmetic as trained weights) at `--size`,
  per `--arch`; images/s with decoding in `--workers` DataLoader workers, on the CPU unless --device says else.

    python benchmarks/converters.py [--tsv-rows 400] [--images 8] [--arch resnet50 resnet152] [--size 512]
                                    [--batch 4] [--workers 1] [--device cpu] [--write]

Prints a table and writes benchmarks/converters.json; `--write` also puts the table, with the command and
the machine, into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch
from results_md import write_section  # benchmarks/ is on sys.path when a benchmark runs

from coder.data.butd import convert_butd_tsv, encode_row
from coder.data.grid import extract_grid_features

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Converters to the precomp layout (benchmarks/converters.py)"
COCO_IMAGES, F30K_IMAGES = 123_287, 31_014  # Karpathy's splits: all images a full conversion writes


def karpathy(path: Path, n: int, ext: str) -> None:
    splits = ["train"] * (n - 2) + ["val", "test"]
    images = [{"split": s, "imgid": i, "filename": f"{10_000 + i}.{ext}",
               "sentences": [{"raw": f"image {i} caption {k}"} for k in range(5)]} for i, s in enumerate(splits)]
    path.write_text(json.dumps({"images": images}))


def bench_tsv(tmp: Path, rows: int) -> dict:
    rng = np.random.default_rng(0)
    tsv = tmp / "feats.tsv"
    with tsv.open("wb") as f:
        for i in rng.permutation(rows):
            f.write(encode_row(10_000 + int(i), 500, 375, rng.random((36, 4)), rng.random((36, 2048))))
    karpathy(tmp / "k_tsv.json", rows, "jpg")
    tsv.read_bytes()  # into the page cache
    stats = convert_butd_tsv([tsv], tmp / "k_tsv.json", tmp / "tsv_out", progress=False)
    size = tsv.stat().st_size
    return {"rows": rows, "seconds": stats["seconds"], "rows_per_s": rows / stats["seconds"],
            "mb_per_s": size / 1e6 / stats["seconds"], "tsv_mb": size / 1e6,
            "coco_hours": COCO_IMAGES / (rows / stats["seconds"]) / 3600}


def bench_grid(tmp: Path, images: int, arch: str, size: int, batch: int, workers: int, device: str) -> dict:
    from PIL import Image

    folder = tmp / "images"
    if not folder.is_dir():
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(images):
            Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(folder / f"{10_000 + i}.jpg")
        karpathy(tmp / "k_img.json", images, "jpg")
    # warm-up: one image (first-call allocations and kernel selection are not the steady rate)
    karpathy(tmp / "k_one.json", 3, "jpg")
    extract_grid_features(folder, tmp / "k_one.json", tmp / f"warm_{arch}", weights=None, arch=arch, size=size,
                          batch_size=batch, num_workers=0, device=device, progress=False)
    stats = extract_grid_features(folder, tmp / "k_img.json", tmp / f"grid_{arch}", weights=None, arch=arch,
                                  size=size, batch_size=batch, num_workers=workers, device=device, progress=False)
    rate = images / stats["seconds"]
    return {"arch": arch, "size": size, "images": images, "seconds": stats["seconds"], "images_per_s": rate,
            "regions": stats["regions"], "device": stats["device"], "f30k_hours": F30K_IMAGES / rate / 3600,
            "coco_hours": COCO_IMAGES / rate / 3600}


def machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", load average %.1f / %.1f / %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return (f"{platform.machine()}, {cpus} CPUs{load}, {torch.get_num_threads()} torch threads, torch "
            f"{torch.__version__}, Python {platform.python_version()}")


def table(result: dict, args) -> str:
    t = result["tsv"]
    lines = [f"{SECTION} ({date.today().isoformat()})",
             f"Command: `python benchmarks/converters.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {machine()}.", "",
             "| converter | input | rate | a full data set at this rate |", "|---|---|---:|---:|",
             f"| BUTD TSV -> precomp | {t['rows']:,} rows of 36 x 2,048 ({t['tsv_mb']:,.0f} MB, page-cached) | "
             f"{t['rows_per_s']:,.0f} rows/s ({t['mb_per_s']:,.0f} MB/s) | COCO's {COCO_IMAGES:,} images: "
             f"{t['coco_hours'] * 60:,.0f} min |"]
    for g in result["grid"]:
        lines.append(f"| {g['arch']} grid, {g['size']} x {g['size']} -> {g['regions']} x 2,048 | {g['images']} JPEGs "
                     f"500 x 375, batch {args.batch}, {args.workers} worker(s), {g['device']} | "
                     f"{g['images_per_s']:.2f} images/s | Flickr30K's {F30K_IMAGES:,}: {g['f30k_hours']:,.1f} h; "
                     f"COCO: {g['coco_hours']:,.1f} h |")
    lines += ["", "The TSV rate is decoding, checking and writing; a real TSV read from disk for the first time is "
              "bound by the disk (COCO's 123,287 rows x about 393 KB of base64 = 48 GB). Grid extraction on a CPU is "
              "for tests and small sets; a data set needs a GPU (`--device auto` picks it). Read the rates with "
              "the load average above: other work shared these CPUs, and torch used the threads "
              "OMP_NUM_THREADS allowed."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tsv-rows", type=int, default=400)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--arch", nargs="+", default=["resnet50", "resnet152"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", action="store_true", help="put the table into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"tsv": bench_tsv(Path(tmp), args.tsv_rows),
                  "grid": [bench_grid(Path(tmp), args.images, arch, args.size, args.batch, args.workers, args.device)
                           for arch in args.arch]}
    result["machine"] = machine()
    (ROOT / "benchmarks" / "converters.json").write_text(json.dumps(result, indent=1))
    text = table(result, args)
    print(text)
    if args.write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
