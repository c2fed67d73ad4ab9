#!/usr/bin/env python
"""Convert the bottom-up-attention detector's TSV output to a precomp tree (S_ims.npy, S_caps.txt, S_ids.txt).

    python scripts/convert_butd_tsv.py --tsv trainval_36.tsv --karpathy dataset_coco.json --out data/coco_precomp
    python scripts/convert_butd_tsv.py --tsv f30k_36.tsv.0 f30k_36.tsv.1 --karpathy dataset_flickr30k.json \
        --out data/f30k_precomp

The TSV (tools/generate_tsv.py of bottom-up-attention) holds image_id, image_w, image_h, num_boxes and base64
float32 boxes and features per line; Karpathy's split file decides each image's split, row and 5 captions
(Flickr30K: train / dev / test; COCO: train with restval / dev / testall). Streams the TSV into memory-mapped
arrays and checkpoints every --checkpoint-rows rows: rerun the same command to resume after a crash. Every row
is checked; a problem is one `error:` line naming the file and line (exit status 2). At the end the tree is
checked as scripts/check_data.py does.
"""
from __future__ import annotations

import argparse
import sys

from coder.data.butd import convert_butd_tsv
from coder.data.karpathy import ID_FIELDS
from coder.data.verify import verify_tree
from coder.errors import CoderError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tsv", nargs="+", required=True, help="the detector's TSV file(s), read in this order")
    parser.add_argument("--karpathy", required=True, help="dataset_flickr30k.json or dataset_coco.json")
    parser.add_argument("--out", required=True, help="output precomp folder (created; resumes a partial one)")
    parser.add_argument("--dataset", choices=("auto", "f30k", "coco"), default="auto",
                        help="auto: coco when the Karpathy entries have 'cocoid'")
    parser.add_argument("--id-field", choices=ID_FIELDS, default="auto",
                        help="the Karpathy field matching the TSV's image_id (auto: cocoid for COCO, the "
                             "filename's number for Flickr30K)")
    parser.add_argument("--boxes", type=int, default=36, help="boxes per image (every row must have this many)")
    parser.add_argument("--dim", type=int, default=2048, help="feature size per box")
    parser.add_argument("--checkpoint-rows", type=int, default=2000, help="rows between checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if min(args.boxes, args.dim, args.checkpoint_rows) < 1:
        parser.error("--boxes, --dim and --checkpoint-rows must be >= 1")
    try:
        stats = convert_butd_tsv(args.tsv, args.karpathy, args.out, dataset=args.dataset, id_field=args.id_field,
                                 boxes=args.boxes, dim=args.dim, checkpoint_rows=args.checkpoint_rows,
                                 progress=not args.no_progress)
    except CoderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"converted {stats['rows']:,} rows in {stats['seconds']:.1f} s ({stats['skipped']:,} TSV rows not in "
          f"{args.karpathy} skipped); splits: {stats['splits']}")
    # the image counts are Karpathy's by construction: the check reads the tree as training will
    report = verify_tree(args.out, "any", tuple(stats["splits"]))
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
