"""Evaluate a checkpoint: `python evaluate.py --checkpoint runs/f30k_coder/model_best.pth [--split test]`.

Prints the paper's Table-1 row(s) and writes eval_<split>.json next to the checkpoint (or to --output).
(Installed: `coder-eval`.)
"""
import sys

from coder.cli import evaluate_main as main

if __name__ == "__main__":
    sys.exit(main())
