"""Intervals for evidence: a paired t interval over seeds (the study runner) and a paired bootstrap over test
queries (`evaluate.py --compare`). numpy only: no scipy.

Two different noises: the t interval over seed pairs measures how much a result moves when training is
repeated (seed noise); the bootstrap over queries measures how much it would move on another test set of the
same size drawn from the same distribution, the models held fixed (test-set sampling noise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np


def t_cdf_abs(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df >= 1, exactly, by the finite series in theta = atan(t/√df)
    (Abramowitz & Stegun 26.7.3-26.7.4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 0:  # sin θ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ... up to cos^(df-2)θ)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        return math.sin(theta) * total
    # odd: 2/π (θ + sin θ cos θ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + ... up to cos^(df-3)θ)); df = 1: 2θ/π
    series = 0.0
    if df > 1:
        term, series = 1.0, 1.0
        for k in range(1, (df - 1) // 2):
            term *= (2 * k) / (2 * k + 1) * c2
            series += term
    return 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)


@lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with integer df (0 < p < 1), by bisection on the exact CDF."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    target = abs(2.0 * p - 1.0)  # P(|T| <= q) for the upper quantile q
    lo, hi = 0.0, 1.0
    while t_cdf_abs(hi, df) < target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf_abs(mid, df) < target else (lo, mid)
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    q = 0.5 * (lo + hi)
    return q if p > 0.5 else -q


@dataclass(frozen=True)
class PairedInterval:
    """mean of the paired differences a - b, its t interval at `level`, the number of pairs. With one pair
    there is no interval (half_width None)."""
    mean: float
    half_width: float | None
    n: int
    level: float = 0.95

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


def paired_t_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedInterval:
    """t interval of mean(a_i - b_i) over pairs i (same seed): mean ± t_{(1+level)/2, n-1} · sd / √n.
    The half-width is the smallest difference the pairs resolve at this level."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"need equally many, at least one, paired values; got {len(a)} and {len(b)}")
    diffs = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = diffs.size
    if n == 1:
        return PairedInterval(float(diffs[0]), None, 1, level)
    sd = float(diffs.std(ddof=1))
    return PairedInterval(float(diffs.mean()), t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n), n, level)


def bootstrap_means(values, resamples: int = 1000, seed: int = 0, block: int = 200) -> np.ndarray:
    """(resamples, m) column means of `values` (n units x m columns) over bootstrap resamples of the n units
    (drawn with replacement, seeded). Vectorised: each block of resamples is one bincount of drawn indices and
    one matrix product, so memory stays at block x n."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    n = values.shape[0]
    if n == 0 or resamples < 1:
        raise ValueError(f"need at least one unit and one resample, got {n} units and {resamples} resamples")
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, values.shape[1]))
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        drawn = rng.integers(0, n, size=(size, n))  # one resample per row
        counts = np.bincount((drawn + n * np.arange(size)[:, None]).ravel(), minlength=size * n)
        out[start:start + size] = counts.reshape(size, n) @ values / n
    return out


def percentile_interval(samples, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) percentile interval of bootstrap samples along axis 0."""
    tail = 100.0 * (1.0 - level) / 2.0
    samples = np.asarray(samples, dtype=np.float64)
    return np.percentile(samples, tail, axis=0), np.percentile(samples, 100.0 - tail, axis=0)
