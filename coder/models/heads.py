"""Projection + aggregation heads (VSE-infinity's, as CODER §3.2): local features -> one L2-normalised embedding.

The instance branch owns one image head and one text head; the concept branch owns a second, separate
pair that produces its query vectors v_C^q, w_C^q (§3.2).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..lengths import Lengths, as_lengths
from .aggregators import build_aggregator

FC_INITS = ("torch", "xavier")  # model.image_fc_init


class ImageHead(nn.Module):
    """h = FC(o) + MLP(o) per region, then the aggregator, then L2 normalisation.

    The MLP's BatchNorm only sees real regions: padded rows are dropped before it and restored after,
    so its statistics do not depend on how much padding a batch carries. `bn_padding` feeds it every row,
    padding included, as VSE-infinity's MLP does (lib/modules/mlp.py; model.mlp_bn_padding).
    `fc_init`: "torch" leaves FC at PyTorch's default; "xavier" draws it as VSE-infinity's
    EncoderImageAggr.init_weights does (uniform Xavier weights, zero bias; model.image_fc_init).
    """

    def __init__(self, region_dim: int = 2048, embed_dim: int = 1024, aggregator: str = "gpo",
                 fc_init: str = "torch", bn_padding: bool = False):
        super().__init__()
        if fc_init not in FC_INITS:
            raise ValueError(f"fc_init must be one of {FC_INITS}, got {fc_init!r}")
        self.bn_padding = bn_padding
        self.fc = nn.Linear(region_dim, embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(region_dim, embed_dim // 2),
            nn.BatchNorm1d(embed_dim // 2),
            nn.ReLU(inplace=True),
            nn.Linear(embed_dim // 2, embed_dim),
        )
        self.aggregate = build_aggregator(aggregator)
        if fc_init == "xavier":  # after the other layers, as VSE-infinity: the same draws from the same seed
            nn.init.xavier_uniform_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def local_features(self, regions: Tensor, lengths: Tensor | Lengths) -> Tensor:
        batch, width = regions.shape[:2]
        h = self.fc(regions)
        if self.bn_padding:  # padded rows (zero features) enter the BatchNorm statistics; GPO masks them after
            return h + self.mlp(regions.flatten(0, 1)).to(h.dtype).view_as(h)
        real = as_lengths(lengths, regions, width).real_at(width)  # flat (b, k) index of each real region
        residual = self.mlp(regions.flatten(0, 1).index_select(0, real)).to(h.dtype)  # real regions only
        return h + h.new_zeros(batch * width, h.size(-1)).index_copy(0, real, residual).view_as(h)

    def forward(self, regions: Tensor, lengths: Tensor | Lengths) -> Tensor:
        lengths = as_lengths(lengths, regions, regions.size(1))  # derived once for the MLP and the aggregator
        return F.normalize(self.aggregate(self.local_features(regions, lengths), lengths).float(), dim=-1)


class TextHead(nn.Module):
    """Token states (B, T, H) -> Linear(H -> F) -> aggregator -> L2."""

    def __init__(self, hidden_dim: int = 768, embed_dim: int = 1024, aggregator: str = "gpo"):
        super().__init__()
        self.fc = nn.Linear(hidden_dim, embed_dim)
        self.aggregate = build_aggregator(aggregator)

    def forward(self, token_states: Tensor, lengths: Tensor | Lengths) -> Tensor:
        return F.normalize(self.aggregate(self.fc(token_states), lengths).float(), dim=-1)
