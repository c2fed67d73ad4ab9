"""Bidirectional triplet ranking loss (VSE++) — the BTR baseline of CODER Table 2 row #1."""
from __future__ import annotations

import torch
from torch import Tensor


def triplet(sims: Tensor, margin: float = 0.2, hardest: bool = True) -> Tensor:
    """Sum over the batch of hinge costs in both directions for square `sims` (images x captions).

    hardest=True keeps only the hardest negative per anchor (VSE++); False sums over all negatives, which
    VSE-infinity uses for its first warm-up epoch.
    """
    positives = sims.diagonal()
    off_diagonal = ~torch.eye(sims.size(0), dtype=torch.bool, device=sims.device)
    cost_caption = (margin + sims - positives[:, None]).clamp(min=0) * off_diagonal  # image anchors
    cost_image = (margin + sims - positives[None, :]).clamp(min=0) * off_diagonal  # caption anchors
    if hardest:
        return cost_caption.amax(dim=1).sum() + cost_image.amax(dim=0).sum()
    return cost_caption.sum() + cost_image.sum()
