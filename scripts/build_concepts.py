#!/usr/bin/env python
"""Build CODER's concept vocabulary (CODER §3.2; adjacency as CVSE [49]) from the training captions only.

    python scripts/build_concepts.py --root data/f30k_precomp --glove glove.6B.300d.txt

Writes concepts.npz (words, pos, counts, cooccurrence, glove) and concepts.json into --output
(default: --root). Splits other than train are refused: dev/test captions must not leak into the model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from coder.errors import CoderError
from coder.tools.vocabulary import build_concepts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="precomp folder holding <split>_caps.txt")
    parser.add_argument("--split", default="train", help="only 'train' is accepted")
    parser.add_argument("--glove", required=True, help="GloVe text file, e.g. glove.6B.300d.txt")
    parser.add_argument("--output", default=None, help="output folder (default: --root)")
    parser.add_argument("--num-concepts", type=int, default=400, help="g (split 70/20/10 %% noun/adj/verb)")
    parser.add_argument("--pos-method", choices=("auto", "heuristic", "nltk"), default="auto",
                        help="auto: nltk if its tagger data is installed, else the built-in heuristic")
    args = parser.parse_args(argv)
    if args.split != "train":
        parser.error(f"--split {args.split!r} refused: concepts are built from the training captions only")
    try:
        vocab = build_concepts(args.root, args.glove, split=args.split, output_dir=args.output,
                               num_concepts=args.num_concepts, pos_method=args.pos_method)
    except CoderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = vocab.info
    out = Path(args.output) if args.output else Path(args.root)
    print(f"{info['num_concepts']} concepts {info['selected_per_pos']} (pos: {info['pos_method']}, "
          f"GloVe d={info['glove_dim']}) -> {out / 'concepts.npz'}")
    missing = sum(len(v) for v in info["missing_glove_words"].values())
    if missing:
        print(f"{missing} frequent word(s) without a GloVe vector were replaced; see {out / 'concepts.json'}")
    if info["shrunk"]:
        print(f"warning: {info['shrunk_note']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
