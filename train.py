"""Train an image-text retrieval model: `python train.py --config configs/demo.yaml [--set key=value ...]`.

Multi-GPU: `torchrun --nproc_per_node=N train.py --config ...`. See README.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/f30k_coder.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.batch_size=64 (repeatable)")
    parser.add_argument("--output", help="output folder (default runs/<config name>)")
    parser.add_argument("--resume", help="'auto' (the output folder's checkpoint_last.pth) or a checkpoint path")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from coder.checkpoint import CheckpointError
    from coder.config import ConfigError, load_config
    from coder.distributed import cleanup
    from coder.engine import NonFiniteLossError, Trainer

    try:
        cfg = load_config(args.config, args.overrides)
        output = Path(args.output) if args.output else Path("runs") / cfg["name"]
        Trainer(cfg, output, resume=args.resume, progress=not args.no_progress).fit()
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:  # an expected way for training to fail: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
