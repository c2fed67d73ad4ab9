#!/usr/bin/env python
"""Check a precomp tree (downloaded, or written by convert_butd_tsv.py / extract_grid_features.py) before training.

    python scripts/check_data.py data/f30k_precomp --dataset f30k
    python scripts/check_data.py data/coco_precomp --dataset coco --full
    python scripts/check_data.py data/demo                      # --dataset any: no known sizes

Opens every split a run reads with training's own reader (files, dtype, shapes, caption-to-row alignment,
ids), then checks the image counts of the named data set, non-finite values in a sample of rows (--full:
every row), ids over an image's caption rows and ids shared by training and evaluation splits. Prints a
one-screen report; every problem is one `error:` line naming its file. Exit status 0 only when the tree
will train, 1 when a problem was found.
"""
from __future__ import annotations

import argparse
import sys

from coder.data.verify import KNOWN, verify_tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="precomp folder holding <split>_ims.npy and <split>_caps.txt")
    parser.add_argument("--dataset", choices=(*KNOWN, "any"), default="any",
                        help="check the known image counts of Flickr30K (f30k) or MSCOCO (coco); any: none")
    parser.add_argument("--splits", nargs="+", help="the splits a run reads (default: those of --dataset)")
    parser.add_argument("--sample", type=int, default=512, help="rows per split read for the finite check")
    parser.add_argument("--full", action="store_true", help="read every row for the finite check")
    args = parser.parse_args(argv)
    if args.sample < 1:
        parser.error(f"--sample must be >= 1, got {args.sample}")
    report = verify_tree(args.root, args.dataset, tuple(args.splits) if args.splits else None,
                         sample=None if args.full else args.sample)
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
