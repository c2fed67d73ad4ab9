"""Does a run fit its training images better than unseen ones? A checkpoint's R@sum on blocks of the training
split, each ranked as the 1K test is ranked (the block's images against their own captions), beside its R@sum
on dev, with the gap between them.

    python scripts/fit_gap.py runs/study/world_triplet_noise2.5/seed0/model_best.pth [...] \
        [--blocks 3] [--block-size 1000] [--split dev]

A gap near zero says the model has stopped gaining on the data it trains on as much as on unseen data: a loss
that learns the training set better cannot show there, and a common plateau of several methods is the data's
(its noise) or the model's capacity, not overfitting. Blocks are the first `--blocks` runs of `--block-size`
training images, in the split's order; the fusion weight is the one training chose on dev (as evaluate.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from coder.errors import CoderError
from coder.evaluation.encode import encode_for_split
from coder.evaluation.loading import load_for_eval
from coder.evaluation.protocols import rank_block


def fit_gap(path: str, blocks: int, block_size: int, split: str) -> dict:
    """{'train': [R@sum per block], 'split': R@sum of `split` ranked whole} of one checkpoint."""
    device = torch.device("cpu")
    loaded = load_for_eval(path, [], device, who="fit_gap.py")
    train = encode_for_split(loaded.model, loaded.cfg, loaded.tokenizer, "train", device, progress=False)
    n_images = train["v_i"].size(0)
    if blocks * block_size > n_images:
        raise CoderError(f"--blocks {blocks} x --block-size {block_size} exceeds the {n_images} training images "
                         f"of {loaded.cfg['data']['root']}")
    beta = loaded.fusion_beta
    per_block = [rank_block(train, beta, b * block_size, block_size)["rsum"] for b in range(blocks)]
    other = encode_for_split(loaded.model, loaded.cfg, loaded.tokenizer, split, device, progress=False)
    return {"train": per_block, "split": rank_block(other, beta, 0, other["v_i"].size(0))["rsum"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="model_best.pth files")
    parser.add_argument("--blocks", type=int, default=3, help="how many blocks of training images (default 3)")
    parser.add_argument("--block-size", type=int, default=1000, help="images per block (default 1000, as the 1K test)")
    parser.add_argument("--split", default="dev", help="the unseen split to compare with (default dev)")
    args = parser.parse_args(argv)
    lines = [f"| checkpoint | train R@sum ({args.blocks} x {args.block_size} images) | {args.split} R@sum | "
             f"train − {args.split} |", "|---|---:|---:|---:|"]
    try:
        for path in args.checkpoints:
            result = fit_gap(path, args.blocks, args.block_size, args.split)
            train, unseen = statistics.mean(result["train"]), result["split"]
            blocks = ", ".join(f"{r:.1f}" for r in result["train"])
            lines.append(f"| {path} | {train:.1f} ({blocks}) | {unseen:.1f} | {train - unseen:+.1f} |")
    except (CoderError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
