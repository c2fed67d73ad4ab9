"""Train an image-text retrieval model: `python train.py --config configs/demo.yaml [--set key=value ...]`.

Multi-GPU: `torchrun --nproc_per_node=N train.py --config ...`. See README.md. (Installed: `coder-train`.)
"""
import sys

from coder.cli import train_main as main

if __name__ == "__main__":
    sys.exit(main())
