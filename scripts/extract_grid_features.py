#!/usr/bin/env python
"""Grid features of raw images with a frozen ResNet (VSE-infinity's "grid" image features) as a precomp tree.

    python scripts/extract_grid_features.py --images data/flickr30k-images --karpathy dataset_flickr30k.json \
        --weights resnet152-imagenet.pth --out data/f30k_grid
    python scripts/extract_grid_features.py --images data/coco-images --karpathy dataset_coco.json \
        --weights resnet152-imagenet.pth --out data/coco_grid --batch-size 64 --num-workers 8

Every image of Karpathy's splits (paths: COCO's filepath/filename, Flickr30K's filename, under --images) is
resized to --size x --size (512, as VSE-infinity's train_grid.sh), ImageNet-normalised, and layer4's map is
written as (images, (size/32)^2, 2048) float32 rows: 256 regions per image at 512. Set model.region_dim 2048
in the config; data.root is --out. Weights come from a local torchvision-layout ResNet state dict (--weights);
nothing downloads (--random-init is for tests). Runs on the GPU when there is one (--device), batched, with a
progress bar; rerun the same command to resume after a crash. A problem is one `error:` line (exit status 2).
"""
from __future__ import annotations

import argparse
import sys

from coder.data.grid import VSE_INFTY_SIZE, extract_grid_features
from coder.data.karpathy import ID_FIELDS
from coder.data.resnet import BLOCKS
from coder.data.verify import verify_tree
from coder.errors import CoderError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder the Karpathy file's image paths are relative to")
    parser.add_argument("--karpathy", required=True, help="dataset_flickr30k.json or dataset_coco.json")
    parser.add_argument("--out", required=True, help="output precomp folder (created; resumes a partial one)")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--weights", help="a torchvision-layout ResNet state dict (.pth) on this machine")
    weights.add_argument("--random-init", action="store_true", help="random weights (tests and benchmarks only)")
    parser.add_argument("--arch", choices=sorted(BLOCKS), default="resnet152")
    parser.add_argument("--size", type=int, default=VSE_INFTY_SIZE, help="input side in pixels (square resize)")
    parser.add_argument("--splits", nargs="+", help="only these precomp splits (default: all of the file)")
    parser.add_argument("--dataset", choices=("auto", "f30k", "coco"), default="auto")
    parser.add_argument("--id-field", choices=ID_FIELDS, default="auto", help="the id written to S_ids.txt")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding processes (0: in this one)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.size < 32 or min(args.batch_size, args.num_workers + 1) < 1:
        parser.error("--size must be >= 32, --batch-size >= 1, --num-workers >= 0")
    try:
        stats = extract_grid_features(args.images, args.karpathy, args.out, weights=args.weights, arch=args.arch,
                                      size=args.size, splits=tuple(args.splits) if args.splits else None,
                                      dataset=args.dataset, id_field=args.id_field, batch_size=args.batch_size,
                                      num_workers=args.num_workers, device=args.device, seed=args.seed,
                                      progress=not args.no_progress)
    except CoderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rate = stats["rows"] / stats["seconds"] if stats["seconds"] > 0 else float("nan")
    print(f"extracted {stats['rows']:,} images in {stats['seconds']:.1f} s ({rate:.2f} images/s on "
          f"{stats['device']}), {stats['regions']} regions x 2048 each; splits: {stats['splits']}")
    report = verify_tree(args.out, "any", tuple(stats["splits"]))
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
