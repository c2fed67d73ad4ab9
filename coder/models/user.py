"""USER's global-representation based semantic enhancement (GSE) modules.

Both modules enhance the raw region features o (B, L, D) *before* the instance image head of §4.1:
a global vector g (unit norm) is injected into every region, o_k' = o_k + b_k g, with
b = L2norm(softmax_k(lambda_att <g, o_k>)).

- SGE (Self-Guided Enhancement) learns g by self-attention over the regions (published design, USER).
- CGE (CLIP-Guided Enhancement) takes g from a frozen, precomputed CLIP image embedding (USER's CGE).
  The CLIP mapping BN(512) -> Linear(512, F) -> BN -> ReLU -> ... is published; its last layer
  Linear(F, D) and the L2 normalisation are our choice, so the vector can be injected exactly like SGE's g.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lengths import Lengths


def injection_weights(regions: Tensor, g: Tensor, lambda_att: float = 1.0) -> Tensor:
    """b = L2norm_k(softmax_k(lambda_att <g, o_k>)), shape (B, L)."""
    logits = lambda_att * torch.einsum("bld,bd->bl", regions, g)
    return F.normalize(torch.softmax(logits, dim=1), dim=1)


def inject_global(regions: Tensor, g: Tensor, lambda_att: float = 1.0) -> Tensor:
    """o_k' = o_k + b_k g for every region k (shared by SGE and CGE); returns (B, L, D)."""
    b = injection_weights(regions, g, lambda_att)
    return regions + b.unsqueeze(-1) * g.unsqueeze(1)


def _check_regions(regions: Tensor, region_dim: int, who: str) -> None:
    if regions.dim() != 3 or regions.size(-1) != region_dim:
        raise ValueError(
            f"{who}: regions must have shape (B, L, {region_dim}), got {tuple(regions.shape)}")


class SelfGuidedEnhancement(nn.Module):
    """SGE: self-attended global region vector injected into every region.

    The local branch normalises with BatchNorm over the region axis (one statistic per region slot, which
    is why the region count L is fixed); the global branch with BatchNorm over the feature channels.
    """

    def __init__(self, region_dim: int = 2048, num_regions: int = 36, dropout: float = 0.4,
                 lambda_att: float = 1.0) -> None:
        super().__init__()
        self.region_dim = region_dim
        self.num_regions = num_regions
        self.lambda_att = lambda_att
        # local = Dropout(Tanh(BN(Linear(o_k)))), global = Dropout(Tanh(BN(Linear(g0))))
        self.local_linear = nn.Linear(region_dim, region_dim)
        self.local_bn = nn.BatchNorm1d(num_regions)
        self.global_linear = nn.Linear(region_dim, region_dim)
        self.global_bn = nn.BatchNorm1d(region_dim)
        self.dropout = nn.Dropout(dropout)
        # no bias: a logit offset shared by all L regions cancels in the softmax, so it would get no gradient
        self.attention_logit = nn.Linear(region_dim, 1, bias=False)
        for linear in (self.local_linear, self.global_linear, self.attention_logit):
            nn.init.xavier_uniform_(linear.weight)  # as USER's SGE: Xavier weights, zero bias
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "attention_logit.bias", None)  # earlier checkpoints: an offset without effect
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check(self, regions: Tensor, lengths: Tensor | Lengths | None) -> None:
        _check_regions(regions, self.region_dim, "SelfGuidedEnhancement")
        count = regions.size(1)
        if count != self.num_regions:
            raise ValueError(
                f"SelfGuidedEnhancement expects exactly {self.num_regions} regions per image, got {count} "
                "(USER needs a fixed region count: turn region dropout off in USER configs)")
        if isinstance(lengths, Lengths):  # the bounds are Python ints: no read-back in the training step
            if lengths.min_len == lengths.max_len == self.num_regions:
                return
            lengths = lengths.lengths
        if lengths is not None:
            short = lengths != self.num_regions
            if bool(short.any()):
                bad = sorted({int(n) for n in lengths[short].tolist()})
                raise ValueError(
                    f"SelfGuidedEnhancement expects exactly {self.num_regions} valid regions per image, "
                    f"got lengths {bad[:10]} (padded/variable region counts are not supported: "
                    "turn region dropout off in USER configs)")

    def self_attention(self, regions: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (g (B, D) unit-norm global vector, a (B, L) attention over regions)."""
        g0 = regions.mean(dim=1)
        local = self.dropout(torch.tanh(self.local_bn(self.local_linear(regions))))
        global_ = self.dropout(torch.tanh(self.global_bn(self.global_linear(g0))))
        logits = self.attention_logit(local * global_.unsqueeze(1)).squeeze(-1)
        a = torch.softmax(logits, dim=1)
        g = F.normalize(torch.einsum("bl,bld->bd", a, regions), dim=-1)  # g = L2norm(sum_k a_k o_k)
        return g, a

    def forward(self, regions: Tensor, lengths: Tensor | Lengths | None = None) -> Tensor:
        """regions (B, L, D), lengths (B,) or None -> enhanced regions (B, L, D)."""
        self._check(regions, lengths)
        g, _ = self.self_attention(regions)
        return inject_global(regions, g, self.lambda_att)


class ClipGuidedEnhancement(nn.Module):
    """CGE: a frozen CLIP image embedding, mapped to the region space, injected into every region."""

    def __init__(self, clip_dim: int = 512, embed_dim: int = 1024, region_dim: int = 2048,
                 lambda_att: float = 1.0) -> None:
        super().__init__()
        self.clip_dim = clip_dim
        self.region_dim = region_dim
        self.lambda_att = lambda_att
        self.clip_mapping = nn.Sequential(
            nn.BatchNorm1d(clip_dim),
            nn.Linear(clip_dim, embed_dim),
            nn.BatchNorm1d(embed_dim),
            nn.ReLU(inplace=True),
            nn.Linear(embed_dim, region_dim),  # our choice: map to the region dimension D
        )

    def global_vector(self, clip: Tensor) -> Tensor:
        """clip (B, clip_dim) -> unit-norm global vector (B, D), scaled like SGE's g (our choice)."""
        return F.normalize(self.clip_mapping(clip), dim=-1)

    def forward(self, regions: Tensor, clip: Tensor) -> Tensor:
        """regions (B, L, D), clip (B, clip_dim) -> enhanced regions (B, L, D)."""
        _check_regions(regions, self.region_dim, "ClipGuidedEnhancement")
        if clip.dim() != 2 or clip.size(0) != regions.size(0) or clip.size(1) != self.clip_dim:
            raise ValueError(
                f"ClipGuidedEnhancement: clip features must have shape ({regions.size(0)}, {self.clip_dim}), "
                f"got {tuple(clip.shape)}")
        return inject_global(regions, self.global_vector(clip.to(regions.dtype)), self.lambda_att)
