"""Command lines: `coder-train` / `python train.py` and `coder-eval` / `python evaluate.py`.

Only `CoderError` (a problem the user can fix) is printed as one `error: ...` line (exit status 2; a
non-finite loss: 1). Every other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import yaml

from . import demo
from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, from_dict, load_config, merge, nest, parse_override, validate
from .distributed import cleanup
from .eccv import format_eccv
from .engine import NonFiniteLossError, Trainer, resolve_device
from .errors import CoderError
from .evaluation import evaluate_split, format_table, write_json
from .models.model import build_model
from .models.text import load_text_backbone

PATH_KEYS = ("model.text_encoder", "model.concept.vocab")  # where files are; the weights stay the checkpoint's

TRAIN_HELP = """Train an image-text retrieval model: `python train.py --config configs/demo.yaml [--set key=value ...]`.

Multi-GPU: `torchrun --nproc_per_node=N train.py --config ...`. See README.md."""

EVAL_HELP = """Evaluate a checkpoint: `python evaluate.py --checkpoint runs/f30k_coder/model_best.pth [--split test]`.

Prints the paper's Table-1 row(s) and writes eval_<split>.json next to the checkpoint (or to --output)."""


def train_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config, e.g. configs/f30k_coder.yaml (not needed with --resume RUN_DIR)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.batch_size=64 (repeatable)")
    parser.add_argument("--output", help="output folder (default runs/<config name>)")
    parser.add_argument("--resume", help="a run folder (its config.yaml and checkpoint_last.pth: nothing else is "
                        "needed), 'auto' (the output folder's checkpoint_last.pth, if any) or a checkpoint path")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def resolve_run(args: argparse.Namespace) -> tuple[dict, Path, str | None]:
    """(config, output folder, resume) from the command line. `--resume RUN_DIR` needs nothing else: the
    run's own config.yaml (plus any --set, e.g. more epochs) and its checkpoint_last.pth."""
    if args.resume and Path(args.resume).is_dir():
        run = Path(args.resume)
        saved, last = run / "config.yaml", run / "checkpoint_last.pth"
        if not saved.is_file() or not last.is_file():
            raise CheckpointError(f"--resume {run}: nothing to resume, expected {saved} and {last}")
        cfg = from_dict(yaml.safe_load(saved.read_text()))
        for text in args.overrides:
            keys, value = parse_override(text)
            merge(cfg, nest(keys, value))
        validate(cfg)
        return cfg, run, "auto"
    if not args.config:
        raise ConfigError("--config is required (or --resume RUN_DIR with a run folder)")
    cfg = load_config(args.config, args.overrides)
    return cfg, Path(args.output) if args.output else Path("runs") / cfg["name"], args.resume


def train_main(argv=None) -> int:
    args = train_args(argv)
    try:
        cfg, output, resume = resolve_run(args)
        if cfg["data"]["prepare"] == "demo" and os.environ.get("RANK", "0") == "0":
            demo.prepare(cfg)  # the other ranks wait at the Trainer's first barrier
        Trainer(cfg, output, resume=resume, progress=not args.no_progress).fit()
    except NonFiniteLossError as err:  # an expected way for training to fail: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    except CoderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0


def result_name(split: str, checkpoint: str | Path) -> str:
    """eval_<split>.json for model_best.pth (what train.py writes), eval_<split>_<stem>.json for any other
    checkpoint, so evaluating checkpoint_last.pth never overwrites the best model's results."""
    stem = Path(checkpoint).stem
    return f"eval_{split}.json" if stem == "model_best" else f"eval_{split}_{stem}.json"


def training_record(ckpt: dict) -> dict:
    """What train.py records in eval_<split>.json beside the metrics (best_epoch, best_dev_rsum), read from a
    model_best.pth (its epoch is the best one), so that rescoring it never drops training's record."""
    if "optimizer" in ckpt or "best_rsum" not in ckpt:  # checkpoint_last.pth: not the selected model
        return {}
    return {"best_epoch": ckpt["epoch"], "best_dev_rsum": ckpt["best_rsum"]}


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def eval_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model_best.pth or checkpoint_last.pth")
    parser.add_argument("--split", help="split to evaluate (default: the config's data.test_split)")
    parser.add_argument("--fold5", action="store_true", help="COCO protocol: 5-fold 1K averaged, plus 5K")
    parser.add_argument("--eccv", action="store_true",
                        help="COCO testall only: also ECCV Caption mAP@R / R-Precision / R@1 and CxC recalls")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a data/eval key or a path, e.g. --set data.root=/data/f30k_precomp "
                             "--set model.text_encoder=/models/bert-base-uncased")
    parser.add_argument("--output", help="where to write eval_<split>.json (default: the checkpoint's folder)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def evaluate_main(argv=None) -> int:
    args = eval_args(argv)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        cfg = from_dict(ckpt["config"])  # keys added since the checkpoint was written take their defaults
        for text in args.overrides:
            keys, value = parse_override(text)
            if keys[0] not in ("data", "eval") and ".".join(keys) not in PATH_KEYS:
                raise ConfigError(f"evaluate.py only overrides data.* and eval.* keys and the paths "
                                  f"{', '.join(PATH_KEYS)}, not '{'.'.join(keys)}'")
            merge(cfg, nest(keys, value))
        validate(cfg)
        device = resolve_device(args.device)
        bert, tokenizer = load_text_backbone(cfg["model"]["text_encoder"], cfg["model"]["text_layers"])
        model = build_model(cfg, bert, ckpt["model"]).to(device)  # concept buffers come from the checkpoint
        model.load_state_dict(ckpt["model"])
        split = args.split or cfg["data"]["test_split"]
        chosen = any(text.split("=", 1)[0].strip() == "eval.beta" for text in args.overrides)
        beta = None if chosen else ckpt.get("beta")  # the fusion weight picked on dev in training, if any
        result = evaluate_split(model, cfg, tokenizer, split, device, progress=not args.no_progress,
                                fold5=True if args.fold5 else None, eccv=args.eccv, beta=beta)
        result["checkpoint"] = {"path": str(Path(args.checkpoint).resolve()), "epoch": ckpt.get("epoch"),
                                "config_sha256": config_hash(cfg)}
        result.update(training_record(ckpt))
        out_dir = Path(args.output) if args.output else Path(args.checkpoint).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / result_name(split, args.checkpoint), result)
        print(f"{args.checkpoint}: {split} ({cfg['data']['dataset']})\n" + format_table(result))
        if "eccv" in result:
            print(format_eccv(result["eccv"]))
    except CoderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
