"""Evaluate a checkpoint: `python evaluate.py --checkpoint runs/f30k_coder/model_best.pth [--split test]`.

Prints the paper's Table-1 row(s) and writes eval_<split>.json next to the checkpoint (or to --output).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model_best.pth or checkpoint_last.pth")
    parser.add_argument("--split", help="split to evaluate (default: the config's data.test_split)")
    parser.add_argument("--fold5", action="store_true", help="COCO protocol: 5-fold 1K averaged, plus 5K")
    parser.add_argument("--eccv", action="store_true",
                        help="COCO testall only: also ECCV Caption mAP@R / R-Precision / R@1 and CxC recalls")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a data/eval key, e.g. --set data.root=/data/f30k_precomp")
    parser.add_argument("--output", help="where to write eval_<split>.json (default: the checkpoint's folder)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from coder.checkpoint import CheckpointError, load_checkpoint
    from coder.config import ConfigError, merge, nest, parse_override, validate
    from coder.engine import resolve_device
    from coder.eccv import format_eccv
    from coder.evaluation import evaluate_split, format_table, write_json
    from coder.models.model import build_model
    from coder.models.text import load_text_backbone

    try:
        ckpt = load_checkpoint(args.checkpoint)
        cfg = ckpt["config"]
        for text in args.overrides:
            keys, value = parse_override(text)
            if keys[0] not in ("data", "eval"):
                raise ConfigError(f"evaluate.py only overrides data.* and eval.* keys, not '{'.'.join(keys)}'")
            merge(cfg, nest(keys, value))
        validate(cfg)
        device = resolve_device(args.device)
        bert, tokenizer = load_text_backbone(cfg["model"]["text_encoder"], cfg["model"]["text_layers"])
        model = build_model(cfg, bert).to(device)
        model.load_state_dict(ckpt["model"])
        split = args.split or cfg["data"]["test_split"]
        result = evaluate_split(model, cfg, tokenizer, split, device, progress=not args.no_progress,
                                fold5=True if args.fold5 else None, eccv=args.eccv)
        out_dir = Path(args.output) if args.output else Path(args.checkpoint).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / f"eval_{split}.json", result)
        print(f"{args.checkpoint}: {split} ({cfg['data']['dataset']})\n" + format_table(result))
        if "eccv" in result:
            print(format_eccv(result["eccv"]))
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
