"""Checkpoints (docs/training.md, Resume): atomic writes, safe loads, RNG capture, config comparison, and the one
place where configs and checkpoints of older versions are upgraded to today's keys and layout.

A checkpoint is a plain dict of tensors and Python primitives, so it loads with `torch.load(weights_only=True)`;
nothing is unpickled beyond that. Format 2 keeps the momentum key encoders and banks under "momentum" and the PGC
classifier under "objective"; format 1 held the former inside "model" (`upgrade_checkpoint`).
"""
from __future__ import annotations

import copy
import os
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .config import from_dict
from .errors import CheckpointError, ConfigError

FORMAT_VERSION = 2
# keys that may change between a run and its resume without changing what is computed (train.compile: how the
# same step runs, up to float rounding, with the same state dicts)
RESUMABLE_CHANGES = ("train.epochs", "train.log_every", "train.device", "train.save_every",
                     "train.keep_last_checkpoint", "train.compile",
                     "train.dist_timeout_minutes", "data.num_workers", "data.root", "eval.batch_size",
                     "eval.chunk_size", "name")


def atomic_save(obj: dict, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...
        raise CheckpointError(f"checkpoint {path} cannot be read safely (truncated, or not a coder checkpoint): "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != "coder" or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a coder checkpoint (expected a dict with format='coder', "
                              f"'model' and 'config')")
    if ckpt.get("version", 1) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['version']}, newer than this code reads "
                              f"({FORMAT_VERSION}): update coder")
    return upgrade_checkpoint(ckpt)


# ---------------------------------------------------------------------------------- older versions, upgraded
# keys of older versions, dropped when a saved config is read (their job moved or they did nothing)
RETIRED_KEYS = ("method", "loss.uto_lambda", "data.demo_train_images", "data.demo_dev_images",
                "data.demo_test_images", "data.demo_region_dim", "data.demo_seed", "data.clip_dim")
# keys added later whose default changed what the code did: a saved config written before the key existed gets
# the older behaviour, so its run resumes as it started
EARLIER_BEHAVIOUR = {"loss.dcl_positive": "paper", "train.grad_clip_scope": "all"}
# keys whose job another key took over: named in the error for a config file that still sets them
MOVED_KEYS = {"loss.uto_lambda": "loss.instance_weight (UTO's batch term is Eq. 8's instance term; its queue "
                                 "term is weighted by loss.memory_weight)"}


def _holder(data: dict, dotted: str) -> tuple[dict | None, str]:
    """The dict in `data` that holds `dotted`'s last key (None when a parent is missing), and that key."""
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), last


def upgrade_config(layer: dict) -> dict:
    """A config file's mapping as today's keys read it: a key whose job another took over is a ConfigError naming
    both. (The boolean `train.amp` of older versions needs no translation: the schema maps it, `Key.bools`.)"""
    layer = copy.deepcopy(layer)
    for dotted, replacement in MOVED_KEYS.items():
        node, last = _holder(layer, dotted)
        if node is not None and last in node:
            raise ConfigError(f"unknown config key '{dotted}': it is retired, use {replacement}")
    return layer


def saved_config(data: dict) -> dict:
    """A resolved config a run saved (its config.yaml, a checkpoint's) as today's config: keys added since take
    their defaults (or, in EARLIER_BEHAVIOUR, what the code did before them), retired keys are dropped, and UTO's
    old lambda becomes the Eq. 8 weights it meant."""
    data = copy.deepcopy(data)
    for dotted, value in EARLIER_BEHAVIOUR.items():
        node, last = _holder(data, dotted)
        if node is not None:
            node.setdefault(last, value)
    loss = data.get("loss")
    if isinstance(loss, dict) and "uto_lambda" in loss and loss.get("instance") == "uto":
        # UTO once ignored the Eq. 8 weights and used lambda_uto x batch + queue
        loss["instance_weight"], loss["memory_weight"] = loss["uto_lambda"], 1.0
    for dotted in RETIRED_KEYS:
        node, last = _holder(data, dotted)
        if node is not None:
            node.pop(last, None)
    if isinstance(data.get("data"), dict) and isinstance(data["data"].get("demo"), bool):
        del data["data"]["demo"]  # once a switch (data.prepare's job now); the generated world's settings since
    return from_dict(upgrade_config(data))


def upgrade_checkpoint(ckpt: dict) -> dict:
    """A loaded checkpoint in today's layout: format 1 held the momentum key encoders and banks inside "model"
    ("momentum.*") and named the PGC classifier "terms.pgc.classifier.*" (earlier "prototypes.*"); its config is
    upgraded by `saved_config`."""
    if ckpt.get("version", 1) < 2:
        model = ckpt["model"]
        ckpt["model"] = {k: v for k, v in model.items() if not k.startswith("momentum.")}
        momentum = {k[len("momentum."):]: v for k, v in model.items() if k.startswith("momentum.")}
        if momentum:
            ckpt["momentum"] = momentum
        if "objective" in ckpt:
            ckpt["objective"] = {("prototypes." + k[len("terms.pgc.classifier."):]
                                  if k.startswith("terms.pgc.classifier.") else k): v
                                 for k, v in ckpt["objective"].items()}
        ckpt["version"] = FORMAT_VERSION
    return ckpt


def _local_rng_state() -> dict:
    """This process's generators; "cuda" is the state of its own device (None without CUDA)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": list(random.getstate()[1]),
    }


def rng_state() -> dict:
    """Every rank's generators, gathered in rank order (a collective: all ranks call it; rank 0 saves them)."""
    return {"world": dist.world_size(), "ranks": dist.gather_objects(_local_rng_state())}


def _to_cpu(value):
    """Every tensor in a nested dict/list on the CPU: RNG states must be CPU byte tensors and numpy needs a
    CPU tensor, whatever map_location the checkpoint was loaded with."""
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _set_local_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    random.setstate((3, tuple(state["python"]), None))


def _legacy_ranks(state: dict) -> list[dict]:
    """A checkpoint from before per-rank states: rank 0's generators, "cuda" its view of every visible GPU."""
    cuda = state["cuda"]
    device = torch.cuda.current_device() if cuda and torch.cuda.is_available() else 0
    return [{**state, "cuda": cuda[device] if device < len(cuda) else None}]


def set_rng_state(state: dict, seed: int = 0) -> None:
    """Restore this rank's generators from `rng_state()`'s dict (loaded to any device). With another number of
    processes than the run saved, no rank can continue its own stream: each starts a fresh one from `seed`
    and its rank (the resumed run is then no longer bitwise the uninterrupted one), with a warning."""
    state = _to_cpu(state)
    ranks = state["ranks"] if "ranks" in state else _legacy_ranks(state)
    rank, world = dist.rank(), dist.world_size()
    if len(ranks) == world:
        _set_local_rng_state(ranks[rank])
        return
    if rank == 0:
        warnings.warn(f"the checkpoint holds random states of {len(ranks)} process(es) but this run has {world}: "
                      f"every rank starts fresh random streams (dropout differs from an uninterrupted run)",
                      RuntimeWarning, stacklevel=2)
    dist.seed_streams(seed + 1_000_003 * rank + 7919 * len(ranks))


def training_state(cfg: dict, step, optimizer, scaler, progress: dict, kmeans: dict, rng: dict) -> dict:
    """checkpoint_last.pth: everything a killed run needs to continue exactly (docs/training.md, Resume): the
    step's model, momentum encoders and banks, and objective, the optimizer, the gradient scaler, `progress` (the
    counters: epoch, step_in_epoch, global_step, best_rsum, best_epoch, best_beta, and train_seconds, the wall time
    of the training it holds), the k-means state and `rng`,
    `rng_state()`'s every rank's generators (a collective: every rank calls it)."""
    momentum = {"momentum": step.momentum.state_dict()} if step.momentum is not None else {}
    return {"format": "coder", "version": FORMAT_VERSION, "config": cfg, "model": step.model.state_dict(), **momentum,
            "objective": step.objective.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), **progress, "rng": rng, "kmeans": kmeans}


def best_model_state(cfg: dict, model, objective, epoch: int, best_rsum: float, beta: float) -> dict:
    """model_best.pth: the weights chosen on dev and the fusion weight beta chosen with them."""
    return {"format": "coder", "version": FORMAT_VERSION, "config": cfg, "model": model.state_dict(),
            "objective": objective.state_dict(), "epoch": epoch, "best_rsum": best_rsum, "beta": beta}


PROGRESS_KEYS = ("epoch", "step_in_epoch", "global_step", "best_rsum", "best_epoch", "best_beta")


def restore_training(path: str | Path, cfg: dict, step, optimizer, scaler, device) -> dict:
    """Load checkpoint_last.pth into the step's modules, the optimizer, the gradient scaler and the RNGs; refuse a
    checkpoint trained with another config. Returns the counters, the k-means state and the training's wall time."""
    ckpt = load_checkpoint(path, map_location=device)
    diffs = config_differences(saved_config(ckpt["config"]), cfg)
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with a different config; keys that differ: "
                              + "; ".join(diffs))
    step.model.load_state_dict(ckpt["model"])
    if step.momentum is not None:
        step.momentum.load_state_dict(ckpt["momentum"])
    step.objective.load_state_dict(ckpt["objective"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt:
        restore_scaler(scaler, ckpt["scaler"])
    set_rng_state(ckpt["rng"], seed=cfg["train"]["seed"] + ckpt["global_step"])
    progress = {key: ckpt[key] for key in PROGRESS_KEYS if key in ckpt}
    # the wall time of the training so far (a checkpoint written before it was kept: counted from this resume)
    return {**progress, "kmeans": ckpt["kmeans"], "train_seconds": ckpt.get("train_seconds", 0.0)}


def restore_scaler(scaler, state: dict) -> None:
    """fp16's loss scale carried over where the run that wrote it and this one both scale. `train.amp: auto`
    picks per device, so a checkpoint may meet a scaler of another kind: one written without fp16 (CPU, bf16,
    off) holds an empty state, which an enabled GradScaler refuses: this run's fp16 scaler then starts at its
    initial scale and calibrates itself within its first steps; a disabled scaler (fp16 -> bf16, CPU, off)
    has nothing to restore."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)


def flatten(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict, current: dict, ignore=RESUMABLE_CHANGES) -> list[str]:
    """'key: saved -> current' for every key that differs (ignoring those that may change on resume)."""
    a, b = flatten(saved), flatten(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]
