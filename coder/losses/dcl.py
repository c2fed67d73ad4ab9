"""Diversity-sensitive contrastive losses of CODER (paper §3.3, Eq. 3-6).

`sims` rows are anchors, columns the candidates they are compared with (cosine similarities of
L2-normalised embeddings). Every function here handles ONE direction; the bidirectional
L_DCL(V, W) = l(V, W) + l(W, V) of Eq. 4/5 is `dcl_bidirectional` or the caller's sum.
Losses are computed in at least float32, whatever the input dtype (fp16/bf16 under autocast).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["diversity", "dcl", "dcl_bidirectional"]

_VAR_FLOOR = 1e-12  # SD >= 1e-6: identical embeddings give div = 1, not a NaN
_POS_FLOOR = 1e-6  # 1 + S_pos >= 1e-6: log stays finite at S_pos = -1
POSITIVE_FORMS = ("paper", "unscaled")  # how the outer mu treats log(1 + S_pos); see `dcl`


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 kept (gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


def _check_sims(sims: Tensor, square: bool) -> None:
    if sims.dim() != 2:
        raise ValueError(f"sims must be a 2-D (anchors, candidates) matrix, got shape {tuple(sims.shape)}")
    if square and sims.shape[0] != sims.shape[1]:
        raise ValueError(
            f"sims of shape {tuple(sims.shape)} is not square: pass pos_sims (N,) for the "
            "memory-bank form, or a square matrix whose diagonal holds the positives"
        )


def _check_mask(mask: Tensor | None, name: str, sims: Tensor) -> None:
    if mask is not None and (mask.shape != sims.shape or mask.dtype != torch.bool):
        raise ValueError(
            f"{name} must be a bool tensor of sims' shape {tuple(sims.shape)}, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )


def _check_vector(v: Tensor | None, name: str, n: int) -> None:
    if v is not None and v.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one value per anchor), got {tuple(v.shape)}")


def _diagonal_mask(sims: Tensor) -> Tensor:
    return torch.eye(sims.shape[0], sims.shape[1], dtype=torch.bool, device=sims.device)


def diversity(
    sims: Tensor, pos_mask: Tensor | None = None, eps: float = 0.1, normalize: bool = True
) -> Tensor:
    """Diversity of each anchor (row) from the spread of its negative similarities (Eq. 3).

    Args:
        sims: (N, Q) similarities, rows are anchors.
        pos_mask: (N, Q) bool, True marks entries that are NOT negatives (excluded). Default: the
            diagonal for a square `sims`; no exclusion for a non-square one (memory-bank form).
        eps: the paper's epsilon (0.1).
        normalize: divide by the maximum over the anchors (Eq. 3, last line).

    Returns:
        (N,) diversities in the compute dtype. Differentiable: detach it to use it as a weight only
        (the paper-faithful default).
    """
    _check_sims(sims, square=False)
    _check_mask(pos_mask, "pos_mask", sims)
    if pos_mask is None and sims.shape[0] == sims.shape[1]:
        pos_mask = _diagonal_mask(sims)
    s = sims.to(_compute_dtype(sims))
    negative = torch.ones_like(s, dtype=torch.bool) if pos_mask is None else ~pos_mask
    weight = negative.to(s.dtype)
    count = weight.sum(dim=1).clamp_min(1.0)  # a row without negatives gets SD at the floor -> div 1
    mean = (s * weight).sum(dim=1) / count  # E[S]
    # E[S^2] - E[S]^2, written centred so float32 does not cancel catastrophically
    variance = (((s - mean[:, None]) * weight) ** 2).sum(dim=1) / count
    sd = variance.clamp_min(_VAR_FLOOR).sqrt()  # Eq. 3, SD
    div = 1.0 / torch.sigmoid(eps / sd)  # Eq. 3, div = 1 / sigma(eps / SD)
    if normalize:
        div = div / div.max()  # Eq. 3, divide by the batch maximum
    return div


def dcl(
    sims: Tensor,
    pos_sims: Tensor | None = None,
    mu: float = 0.1,
    gamma: float = 0.3,
    div: Tensor | None = None,
    neg_mask: Tensor | None = None,
    positive: str = "paper",
) -> Tensor:
    """One direction of the (diversity-sensitive) contrastive loss, averaged over anchors.

    mu * [log(1 + sum_neg exp((S_nq - gamma) / (mu * div_n))) - log(1 + S_pos)]:
    Eq. 4 (DCL-I) when `div` is None, Eq. 5 (DCL) otherwise, Eq. 6 (M-DCL) with `pos_sims`.
    With positive="unscaled" the outer mu multiplies the negative term only:
    mu * log(1 + sum_neg exp(...)) - log(1 + S_pos) (the form of USER's public code; see docs/departures.md).

    Args:
        sims: (N, Q) similarities, rows are anchors. Without `pos_sims` it must be square: the
            diagonal holds the positives and every off-diagonal entry is a negative.
        pos_sims: (N,) positive similarities (M-DCL: anchor vs its paired momentum key); then every
            column of `sims` (the queue) is a negative.
        mu: temperature (0.1); also the outer factor, which does not scale with div.
        gamma: margin (0.3).
        div: (N,) anchor diversities from `diversity`. Used as given: pass `div.detach()` for the
            paper's weighting-only behaviour (gradients flow through div otherwise).
        neg_mask: (N, Q) bool, True excludes that entry from the negatives (e.g. queue entries of the
            anchor's own image: false-negative masking ablation).
        positive: "paper" (Eq. 4-6 as printed: mu scales both terms) or "unscaled" (mu scales the
            negative term only, so a positive pair is pulled with gradient 1 / (1 + S_pos)).

    Returns:
        Scalar loss in the compute dtype (float32 for half/bfloat16 inputs).
    """
    _check_sims(sims, square=pos_sims is None)
    _check_mask(neg_mask, "neg_mask", sims)
    _check_vector(pos_sims, "pos_sims", sims.shape[0])
    _check_vector(div, "div", sims.shape[0])
    if mu <= 0:
        raise ValueError(f"mu must be positive, got {mu}")
    if positive not in POSITIVE_FORMS:
        raise ValueError(f"positive must be one of {POSITIVE_FORMS}, got {positive!r}")
    dtype = _compute_dtype(sims)
    s = sims.to(dtype)
    if pos_sims is None:
        pos = s.diagonal()
        excluded = _diagonal_mask(s) if neg_mask is None else neg_mask | _diagonal_mask(s)
    else:
        pos = pos_sims.to(dtype)
        excluded = neg_mask
    temperature = mu if div is None else mu * div.to(dtype)[:, None]  # Eq. 4 / Eq. 5
    logits = (s - gamma) / temperature
    if excluded is not None:
        logits = logits.masked_fill(excluded, float("-inf"))
    # log(1 + sum exp(x)) = logsumexp over [0, x...]: stable, and finite even with no negatives
    zero = logits.new_zeros(logits.shape[0], 1)
    negative_term = torch.cat([zero, logits], dim=1).logsumexp(dim=1)
    positive_term = torch.log((1.0 + pos).clamp_min(_POS_FLOOR))
    if positive == "unscaled":
        return (mu * negative_term - positive_term).mean()  # departure: positive term without mu
    return mu * (negative_term - positive_term).mean()  # Eq. 4/5, mean over anchors


def dcl_bidirectional(
    sims: Tensor,
    mu: float = 0.1,
    gamma: float = 0.3,
    div_rows: Tensor | None = None,
    div_cols: Tensor | None = None,
    positive: str = "paper",
) -> Tensor:
    """L_DCL(V, W) = l(V, W) + l(W, V) on a square (N, N) batch matrix (Eq. 4/5).

    `div_rows` are the diversities of the row anchors (images), `div_cols` of the column anchors
    (texts, i.e. the rows of sims.T); None for both gives DCL-I. `positive` as in `dcl`.
    """
    return dcl(sims, mu=mu, gamma=gamma, div=div_rows, positive=positive) + \
        dcl(sims.t(), mu=mu, gamma=gamma, div=div_cols, positive=positive)
