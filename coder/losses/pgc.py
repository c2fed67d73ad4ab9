"""Prototype-guided classification (PGC), CODER paper §3.4, Eq. 7.

The concept-level embeddings of both modalities are classified into the K prototypes (online
k-means cluster ids z of the instance-level embeddings) by one shared, bias-free matrix P^C.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PrototypeClassifier(nn.Module):
    """P^C in R^{K x F}, no bias, shared by v^C and w^C: logits = P^C x."""

    def __init__(self, num_prototypes: int = 10000, dim: int = 1024) -> None:
        super().__init__()
        self.prototypes = nn.Linear(dim, num_prototypes, bias=False)  # weight is P^C (K x F)

    def forward(self, x: Tensor) -> Tensor:
        return self.prototypes(x)


def pgc(logits_v: Tensor, logits_w: Tensor, labels: Tensor) -> Tensor:
    """L_PGC = CE(P^C v^C, z) + CE(P^C w^C, z), each averaged over the batch (Eq. 7).

    ``labels`` are the prototype ids z of the batch's pairs, read by dataset index by the caller.
    """
    if logits_v.shape != logits_w.shape or logits_v.ndim != 2:
        raise ValueError(
            f"pgc: logits must both be (B, K); got {tuple(logits_v.shape)} and {tuple(logits_w.shape)}"
        )
    if labels.shape != logits_v.shape[:1] or labels.dtype.is_floating_point:
        raise ValueError(f"pgc: labels must be integer ids of shape ({logits_v.shape[0]},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    labels = labels.long()  # ids come from k-means with K clusters; no range check: it would sync every step
    return F.cross_entropy(logits_v, labels) + F.cross_entropy(logits_w, labels)  # Eq. 7
