"""Projection + aggregation heads (VSE-infinity's, as CODER §3.2): local features -> one L2-normalised embedding.

The instance branch owns one image head and one text head; the concept branch owns a second, separate
pair that produces its query vectors v_C^q, w_C^q (§3.2).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..lengths import Lengths, as_lengths
from .aggregators import build_aggregator


class ImageHead(nn.Module):
    """h = FC(o) + MLP(o) per region, then the aggregator, then L2 normalisation.

    The MLP's BatchNorm only sees real regions: padded rows are dropped before it and restored after,
    so its statistics do not depend on how much padding a batch carries.
    """

    def __init__(self, region_dim: int = 2048, embed_dim: int = 1024, aggregator: str = "gpo"):
        super().__init__()
        self.fc = nn.Linear(region_dim, embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(region_dim, embed_dim // 2),
            nn.BatchNorm1d(embed_dim // 2),
            nn.ReLU(inplace=True),
            nn.Linear(embed_dim // 2, embed_dim),
        )
        self.aggregate = build_aggregator(aggregator)

    def local_features(self, regions: Tensor, lengths: Tensor | Lengths) -> Tensor:
        batch, width = regions.shape[:2]
        real = as_lengths(lengths, regions, width).real_at(width)  # flat (b, k) index of each real region
        h = self.fc(regions)
        residual = self.mlp(regions.flatten(0, 1).index_select(0, real)).to(h.dtype)  # real regions only
        return h + h.new_zeros(batch * width, h.size(-1)).index_copy(0, real, residual).view_as(h)

    def forward(self, regions: Tensor, lengths: Tensor | Lengths) -> Tensor:
        lengths = as_lengths(lengths, regions, regions.size(1))  # derived once for the MLP and the aggregator
        return F.normalize(self.aggregate(self.local_features(regions, lengths), lengths).float(), dim=-1)


class TextHead(nn.Module):
    """Token states (B, T, H) -> Linear(H -> F) -> aggregator -> L2. Without `project` (H = F) there is no
    Linear: VSE-infinity's BiGRU encoder pools the GRU's states directly (`bigru` branch, EncoderText)."""

    def __init__(self, hidden_dim: int = 768, embed_dim: int = 1024, aggregator: str = "gpo", project: bool = True):
        super().__init__()
        if not project and hidden_dim != embed_dim:
            raise ValueError(f"TextHead without projection needs hidden_dim == embed_dim, got {hidden_dim} and "
                             f"{embed_dim}")
        self.fc = nn.Linear(hidden_dim, embed_dim) if project else nn.Identity()
        self.aggregate = build_aggregator(aggregator)

    def forward(self, token_states: Tensor, lengths: Tensor | Lengths) -> Tensor:
        return F.normalize(self.aggregate(self.fc(token_states), lengths).float(), dim=-1)
