#!/usr/bin/env python
"""Write the embedded demo data set (data/README.md) in the precomp format.

    python scripts/make_demo_data.py --out data/demo --seed 0

Regenerates only when data/demo/MANIFEST.json is missing or names other parameters (--force: always).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from coder.demo import demo_is_current, ensure_demo_data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--dev-images", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--region-dim", type=int, default=256, help="region feature size (real data: 2048)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the data are current")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    params = dict(seed=args.seed, train_images=args.train_images, dev_images=args.dev_images,
                  test_images=args.test_images, region_dim=args.region_dim)
    out = Path(args.out)
    if not args.force and demo_is_current(out, **params):
        print(f"{out} is current; nothing to do (use --force to regenerate)")
        return out
    start = time.perf_counter()
    ensure_demo_data(out, force=args.force, **params)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return out


if __name__ == "__main__":
    main()
