"""Checkpoints (README: Resume): atomic writes, safe loads, RNG capture, config comparison.

A checkpoint is a plain dict of tensors and Python primitives, so it loads with
`torch.load(weights_only=True)`; nothing is unpickled beyond that.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

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


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": list(random.getstate()[1]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    random.setstate((3, tuple(state["python"]), None))


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
