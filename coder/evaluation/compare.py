"""Evidence on one test split (`evaluate.py --compare`): the paired bootstrap of ΔR@K and ΔR@sum between two
models (or ensembles), resampling the test images with their captions."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import EvaluationError
from ..stats import bootstrap_means, percentile_interval
from .protocols import Member, protocol_ranks
from .ranking import RECALL_KS

COMPARED = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_KS) + ("rsum",)


def hit_differences(ranks_a: tuple[Tensor, Tensor], ranks_b: tuple[Tensor, Tensor],
                    captions_per_image: int = 5) -> np.ndarray:
    """(n_images, 6): per test image, 100 x (hit of a - hit of b), hit = rank < K, for i2t R@1/5/10 (the
    image as query) and t2i R@1/5/10 (averaged over its captions). Column means are the ΔR@K exactly."""
    columns = []
    for side, (a, b) in enumerate(zip(ranks_a, ranks_b)):
        for k in RECALL_KS:
            diff = (a < k).double() - (b < k).double()
            columns.append(100.0 * (diff.view(-1, captions_per_image).mean(1) if side else diff))
    return torch.stack(columns, dim=1).numpy()


def paired_bootstrap(ranks_a: tuple[Tensor, Tensor], ranks_b: tuple[Tensor, Tensor], captions_per_image: int = 5,
                     resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """ΔR@K and ΔR@sum (a - b) with percentile intervals from resampling the test images with replacement,
    each with its captions, so i2t and t2i (whose queries of one image share one target) move together."""
    values = hit_differences(ranks_a, ranks_b, captions_per_image)
    samples = bootstrap_means(values, resamples, seed)
    samples = np.column_stack([samples, samples.sum(axis=1)])  # R@sum = the sum of the six R@K
    observed = np.append(values.mean(axis=0), values.mean(axis=0).sum())
    low, high = percentile_interval(samples, level)
    return {name: {"delta": float(o), "low": float(lo), "high": float(hi)}
            for name, o, lo, hi in zip(COMPARED, observed, low, high)}


def check_resamples(resamples: int) -> None:
    if resamples < 1000:
        raise EvaluationError(f"--resamples {resamples}: take at least 1000, or the 2.5% and 97.5% percentiles "
                              "are themselves noisy")


def compare_members(members_a: Sequence[Member], members_b: Sequence[Member], captions_per_image: int = 5,
                    fold5: bool = False, chunk_size: int = 1000, resamples: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Paired bootstrap of a against b (each one model or an ensemble) on the same split, per protocol row."""
    shapes = [(m[0][0]["v_i"].size(0), m[0][0]["w_i"].size(0)) for m in (members_a, members_b)]
    if shapes[0] != shapes[1]:
        raise EvaluationError(f"--compare needs the same split for both models: {shapes[0][0]} images / "
                              f"{shapes[0][1]} captions against {shapes[1][0]} / {shapes[1][1]}")
    check_resamples(resamples)
    ranks_a = protocol_ranks(members_a, captions_per_image, fold5, chunk_size)
    ranks_b = protocol_ranks(members_b, captions_per_image, fold5, chunk_size)
    rows = {row: paired_bootstrap(ranks_a[row], ranks_b[row], captions_per_image, resamples, seed, level)
            for row in ranks_a}
    return {"resamples": resamples, "seed": seed, "level": level, "unit": "test image with its captions", **rows}
