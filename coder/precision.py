"""Float32 precision on CUDA: TF32 for the training step only (`train.tf32`), never where a decision is made
(k-means assignment, ranking), and what `train.deterministic` needs from CUDA.

TF32 keeps 10 mantissa bits (about 3 significant digits): a k-means assignment among K = 10,000 centroids
(§3.4) or a ranking (§4.1) can flip between near ties, so those always run in IEEE float32, as `evaluate.py`.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

# cuBLAS is deterministic only with a fixed workspace; read when its first handle is created (the first
# matmul), so it is set before any CUDA matmul runs
CUBLAS_WORKSPACE = ":4096:8"


def _flags() -> list[tuple[object, str, object, object]]:
    """(holder, attribute, tf32 value, ieee value) of the switches this torch has. torch >= 2.9 has the
    `fp32_precision` API and refuses a mix of it with the legacy `allow_tf32`, so only one family is used."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        return [(matmul, "fp32_precision", "tf32", "ieee"), (cudnn, "fp32_precision", "tf32", "ieee")]
    return [(matmul, "allow_tf32", True, False), (cudnn, "allow_tf32", True, False)]


@contextmanager
def tf32(enabled: bool):
    """Float32 matmuls and convolutions in TF32 (`enabled`) or IEEE float32 inside the block; the previous
    settings are restored on exit."""
    flags = _flags()
    saved = [getattr(holder, name) for holder, name, _, _ in flags]
    try:
        for holder, name, on, off in flags:
            setattr(holder, name, on if enabled else off)
        yield
    finally:
        for (holder, name, _, _), value in zip(flags, saved):
            setattr(holder, name, value)


def set_deterministic() -> None:
    """What bitwise-repeatable CUDA runs need: deterministic algorithms (a warning names each op that has
    none), cuDNN without autotuning, and cuBLAS's fixed workspace (a user's own setting is kept)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
