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
from .checkpoint import saved_config, upgrade_config
from .config import key_table, load_config, merge, nest, parse_override, validate
from .distributed import cleanup
from .engine import NonFiniteLossError, Trainer, resolve_device
from .errors import CheckpointError, CoderError, ConfigError, EvaluationError
from .evaluation import (
    Member,
    check_resamples,
    compare_members,
    encode_for_split,
    evaluate_members,
    evaluate_split,
    format_comparison,
    format_eccv,
    format_table,
    member,
    on_device,
    protocol_fold5,
    write_json,
)
from .evaluation.loading import Loaded, check_folder, load_for_eval
from .step import check_config

TRAIN_HELP = """Train an image-text retrieval model: `python train.py --config configs/demo.yaml [--set key=value ...]`.

Multi-GPU: `torchrun --nproc_per_node=N train.py --config ...`. See README.md."""

EVAL_HELP = """Evaluate a checkpoint: `python evaluate.py --checkpoint runs/f30k_coder/model_best.pth [--split test]`.

Prints the paper's Table-1 row(s) and writes eval_<split>.json next to the checkpoint (or to --output).

Evidence on one test split (see docs/evaluation.md):
  --compare B.pth      paired bootstrap of ΔR@1/5/10 (i2t, t2i) and ΔR@sum, this checkpoint minus B, with 95%
                       percentile intervals: the test images are resampled with replacement, each with its
                       captions (i2t queries are images, t2i queries captions; one image's captions share
                       one target, so they move together). It measures test-set sampling noise, not seed
                       noise. COCO testall: both protocol rows, the 5-fold 1K average (every query ranked
                       within its own 1K fold, the images resampled over all 5,000) and 5K.
  --checkpoint A.pth B.pth ...
                       an ensemble: each model's fused similarity (its own beta) averaged, block by block;
                       labelled "ensemble of N" in the table and the JSON (eval_<split>_ensemble_of_N_<id>.json)."""


def train_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config, e.g. configs/f30k_coder.yaml (not needed with --resume RUN_DIR)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.batch_size=64 (repeatable)")
    parser.add_argument("--output", help="output folder (default runs/<config name>)")
    parser.add_argument("--resume", help="a run folder (its config.yaml and checkpoint_last.pth: nothing else is "
                        "needed), 'auto' (the output folder's checkpoint_last.pth, if any) or a checkpoint path")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--keys", action="store_true", help="list every config key (default, allowed values, what "
                        "it does) and exit")
    return parser.parse_args(argv)


def resolve_run(args: argparse.Namespace) -> tuple[dict, Path, str | None]:
    """(config, output folder, resume) from the command line. `--resume RUN_DIR` needs nothing else: the
    run's own config.yaml (plus any --set, e.g. more epochs) and its checkpoint_last.pth."""
    if args.resume and Path(args.resume).is_dir():
        run = Path(args.resume)
        saved, last = run / "config.yaml", run / "checkpoint_last.pth"
        if not saved.is_file() or not last.is_file():
            raise CheckpointError(f"--resume {run}: nothing to resume, expected {saved} and {last}")
        cfg = saved_config(yaml.safe_load(saved.read_text()))
        for text in args.overrides:
            keys, value = parse_override(text)
            merge(cfg, nest(keys, value))
        validate(cfg)
        return cfg, run, "auto"
    if not args.config:
        raise ConfigError("--config is required (or --resume RUN_DIR with a run folder)")
    cfg = load_config(args.config, args.overrides, upgrade=upgrade_config)
    check_config(cfg)  # the names the registries own, before any data is prepared
    return cfg, Path(args.output) if args.output else Path("runs") / cfg["name"], args.resume


def train_main(argv=None) -> int:
    args = train_args(argv)
    if args.keys:
        print(key_table(), end="")
        return 0
    try:
        cfg, output, resume = resolve_run(args)
        check_folder(output, "--output" if args.output else "the output folder")
        check_folder(Path(cfg["data"]["root"]), "config key 'data.root'")
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
    parser.add_argument("--checkpoint", required=True, nargs="+", metavar="PTH",
                        help="model_best.pth or checkpoint_last.pth; several: their ensemble")
    parser.add_argument("--compare", metavar="B.pth", help="paired bootstrap of this checkpoint against B")
    parser.add_argument("--resamples", type=int, default=1000, help="--compare: bootstrap resamples (>= 1000)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="--compare: seed of the resampling")
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


def checkpoint_info(loaded: Loaded) -> dict:
    return {"path": str(Path(loaded.path).resolve()), "epoch": loaded.ckpt.get("epoch"),
            "config_sha256": config_hash(loaded.cfg)}


def encode_member(loaded: Loaded, split: str, device, progress: bool, first: Loaded | None = None) -> Member:
    """(embeddings, own beta) of one checkpoint on the split; with `first`, refuse a different split."""
    if first is not None:
        data, other = first.cfg["data"], loaded.cfg["data"]
        if Path(data["root"]).resolve() != Path(other["root"]).resolve() or \
                data["captions_per_image"] != other["captions_per_image"]:
            raise EvaluationError(f"{loaded.path} reads split '{split}' from {other['root']}, {first.path} from "
                                  f"{data['root']}: models compared or ensembled need one split (--set data.root=...)")
    emb = encode_for_split(loaded.model, loaded.cfg, loaded.tokenizer, split, device, progress)
    return member(on_device(emb, device), loaded.fusion_beta)  # ranked where the model ran


def ensemble_result(args, first: Loaded, members: list[Member], split: str, device) -> dict:
    """The averaged similarity of every --checkpoint (each loaded, encoded and released in turn); `members`
    holds the first checkpoint's and gets the others', for --compare to use."""
    if args.eccv:
        raise EvaluationError("--eccv evaluates one model, not an ensemble of several --checkpoint")
    infos = [checkpoint_info(first) | {"beta": members[0][1]}]
    for path in args.checkpoint[1:]:
        loaded = load_for_eval(path, args.overrides, device)
        members.append(encode_member(loaded, split, device, not args.no_progress, first))
        infos.append(checkpoint_info(loaded) | {"beta": members[-1][1]})
        del loaded  # released before the next one loads; its embeddings stay
    cfg = first.cfg
    fold5 = protocol_fold5(cfg, split, members[0][0]["v_i"].size(0), True if args.fold5 else None)
    result = evaluate_members(members, cfg["data"]["captions_per_image"], fold5, cfg["eval"]["chunk_size"])
    result.update(ensemble=list(args.checkpoint), members=infos, split=split, dataset=cfg["data"]["dataset"])
    return result


def compare_result(args, first: Loaded, members: list[Member], split: str, device) -> dict:
    """--compare: the paired bootstrap of the evaluated model (or ensemble) against B on the same split."""
    other = load_for_eval(args.compare, args.overrides, device)
    b = encode_member(other, split, device, not args.no_progress, first)
    cfg = first.cfg
    fold5 = protocol_fold5(cfg, split, members[0][0]["v_i"].size(0), True if args.fold5 else None)
    compare = compare_members(members, [b], cfg["data"]["captions_per_image"], fold5, cfg["eval"]["chunk_size"],
                              args.resamples, args.bootstrap_seed)
    return {"against": checkpoint_info(other) | {"beta": b[1]}, **compare}


def ensemble_name(split: str, checkpoints: list[str]) -> str:
    """eval_<split>_ensemble_of_N_<id>.json: never a single model's file name; the id tells ensembles apart."""
    digest = hashlib.sha256("\n".join(str(Path(p).resolve()) for p in checkpoints).encode()).hexdigest()[:8]
    return f"eval_{split}_ensemble_of_{len(checkpoints)}_{digest}.json"


def evaluate_main(argv=None) -> int:
    args = eval_args(argv)
    try:
        if args.compare:
            check_resamples(args.resamples)  # before minutes of encoding
        out_dir = Path(args.output) if args.output else Path(args.checkpoint[0]).parent
        check_folder(out_dir, "--output")
        device = resolve_device(args.device)
        first = load_for_eval(args.checkpoint[0], args.overrides, device)
        cfg = first.cfg
        split = args.split or cfg["data"]["test_split"]
        evidence = len(args.checkpoint) > 1 or args.compare
        members = [encode_member(first, split, device, not args.no_progress)] if evidence else []
        if len(args.checkpoint) > 1:
            result = ensemble_result(args, first, members, split, device)
        else:
            result = evaluate_split(first.model, cfg, first.tokenizer, split, device, progress=not args.no_progress,
                                    fold5=True if args.fold5 else None, eccv=args.eccv, beta=first.beta,
                                    emb=members[0][0] if members else None)
            result["checkpoint"] = checkpoint_info(first)
            result.update(training_record(first.ckpt))  # model_best's epoch and dev R@sum stay in the record
        if args.compare:
            result["compare"] = compare_result(args, first, members, split, device)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = ensemble_name(split, args.checkpoint) if "ensemble" in result else result_name(split, args.checkpoint[0])
        write_json(out_dir / name, result)
        print(f"{', '.join(args.checkpoint)}: {split} ({cfg['data']['dataset']})\n" + format_table(result))
        if "compare" in result:
            label = f"ensemble of {len(args.checkpoint)}" if "ensemble" in result else args.checkpoint[0]
            print(format_comparison(result["compare"], label, args.compare))
        if "eccv" in result:
            print(format_eccv(result["eccv"]))
    except CoderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
