"""Checkpoints (README: Resume): atomic writes, safe loads, RNG capture, config comparison.

A checkpoint is a plain dict of tensors and Python primitives, so it loads with
`torch.load(weights_only=True)`; nothing is unpickled beyond that.
"""
from __future__ import annotations

import os
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist
from .errors import CoderError

FORMAT_VERSION = 1
# keys that may change between a run and its resume without changing what is computed
RESUMABLE_CHANGES = ("train.epochs", "train.log_every", "train.device", "train.save_every",
                     "train.keep_last_checkpoint",
                     "train.dist_timeout_minutes", "data.num_workers", "data.root", "eval.batch_size",
                     "eval.chunk_size", "name")


class CheckpointError(CoderError, ValueError):
    """A checkpoint file is missing, unreadable, not ours, or does not match the config."""


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


def training_state(cfg: dict, model, objective, optimizer, scaler, progress: dict, kmeans: dict, rng: dict) -> dict:
    """checkpoint_last.pth: everything a killed run needs to continue exactly (README: Resume). `progress`
    holds the counters (epoch, step_in_epoch, global_step, best_rsum, best_epoch, best_beta); `rng` is
    `rng_state()`, every rank's generators (a collective: every rank calls it)."""
    return {"format": "coder", "version": FORMAT_VERSION, "config": cfg, "model": model.state_dict(),
            "objective": objective.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            **progress, "rng": rng, "kmeans": kmeans}


def best_model_state(cfg: dict, model, objective, epoch: int, best_rsum: float, beta: float) -> dict:
    """model_best.pth: the weights chosen on dev and the fusion weight beta chosen with them."""
    return {"format": "coder", "version": FORMAT_VERSION, "config": cfg, "model": model.state_dict(),
            "objective": objective.state_dict(), "epoch": epoch, "best_rsum": best_rsum, "beta": beta}


PROGRESS_KEYS = ("epoch", "step_in_epoch", "global_step", "best_rsum", "best_epoch", "best_beta")


def restore_training(path: str | Path, cfg: dict, model, objective, optimizer, scaler, device) -> dict:
    """Load checkpoint_last.pth into the modules, the optimizer, the gradient scaler and the RNGs; refuse a
    checkpoint trained with another config. Returns the counters and the k-means state."""
    from .config import from_dict

    ckpt = load_checkpoint(path, map_location=device)
    diffs = config_differences(from_dict(ckpt["config"]), cfg)
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with a different config; keys that differ: "
                              + "; ".join(diffs))
    model.load_state_dict(ckpt["model"])
    objective.load_state_dict(_objective_state(ckpt["objective"]))
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt:
        restore_scaler(scaler, ckpt["scaler"])
    set_rng_state(ckpt["rng"], seed=cfg["train"]["seed"] + ckpt["global_step"])
    progress = {key: ckpt[key] for key in PROGRESS_KEYS if key in ckpt}
    return {**progress, "kmeans": ckpt["kmeans"]}


def restore_scaler(scaler, state: dict) -> None:
    """fp16's loss scale carried over where the run that wrote it and this one both scale. `train.amp: auto`
    picks per device, so a checkpoint may meet a scaler of another kind: one written without fp16 (CPU, bf16,
    off) holds an empty state, which an enabled GradScaler refuses: this run's fp16 scaler then starts at its
    initial scale and calibrates itself within its first steps; a disabled scaler (fp16 -> bf16, CPU, off)
    has nothing to restore."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)


def _objective_state(state: dict) -> dict:
    """The objective's state dict with the PGC classifier under its current name (before the objective was
    made of terms, P^C was `prototypes.prototypes.weight`)."""
    return {("terms.pgc.classifier." + k[len("prototypes."):] if k.startswith("prototypes.") else k): v
            for k, v in state.items()}


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
