"""Triplet (VSE++) and bidirectional InfoNCE against direct float64 loops over anchors and negatives."""
import math

import pytest
import torch

from coder.losses.infonce import infonce
from coder.losses.triplet import triplet


def random_sims(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()


def slow_triplet(s, margin, hardest):
    n = len(s)
    total = 0.0
    for i in range(n):  # image i as anchor: its caption i vs every other caption j
        costs = [max(0.0, margin + s[i][j] - s[i][i]) for j in range(n) if j != i]
        total += max(costs) if hardest else sum(costs)
    for j in range(n):  # caption j as anchor: its image j vs every other image i
        costs = [max(0.0, margin + s[i][j] - s[j][j]) for i in range(n) if i != j]
        total += max(costs) if hardest else sum(costs)
    return total


@pytest.mark.parametrize("hardest", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_matches_loop(hardest, seed):
    s = random_sims(seed=seed)
    expected = slow_triplet(s.detach().tolist(), 0.2, hardest)
    assert triplet(s, 0.2, hardest).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def slow_infonce(s, tau):
    n = len(s)
    i2t = sum(-s[i][i] / tau + math.log(sum(math.exp(s[i][j] / tau) for j in range(n))) for i in range(n)) / n
    t2i = sum(-s[j][j] / tau + math.log(sum(math.exp(s[i][j] / tau) for i in range(n))) for j in range(n)) / n
    return i2t + t2i


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_infonce_matches_loop(tau):
    s = random_sims(seed=4)
    assert infonce(s.double(), tau).item() == pytest.approx(slow_infonce(s.detach().tolist(), tau), rel=1e-6)


def test_infonce_is_finite_at_extreme_similarities():
    s = torch.eye(4) * 2 - 1  # exactly +1 on the diagonal, -1 elsewhere
    assert torch.isfinite(infonce(s, 0.01))
