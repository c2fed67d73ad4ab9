"""Bidirectional InfoNCE (BIN in the CODER paper's introduction): cross-entropy over the batch, both ways."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def infonce(sims: Tensor, temperature: float = 0.05) -> Tensor:
    """Image->text plus text->image cross-entropy (each a mean over anchors), diagonal as targets."""
    logits = sims.float() / temperature
    targets = torch.arange(sims.size(0), device=sims.device)
    return F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)
