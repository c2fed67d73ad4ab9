"""The two keys that restore VSE-infinity's image head where ours departs from it (found by
benchmarks/conformance.py against woodfrog/vse_infty): model.image_fc_init and model.mlp_bn_padding."""
from __future__ import annotations

import math

import pytest
import torch

from coder.config import ConfigError, load_config
from coder.models.heads import ImageHead
from coder.models.model import build_image_encoder


def test_xavier_fc_init_as_vse_infinity():
    """EncoderImageAggr.init_weights: FC weights uniform in +-sqrt(6 / (in + out)), bias zero."""
    torch.manual_seed(0)
    head = ImageHead(64, 32, fc_init="xavier")
    bound = math.sqrt(6.0 / (64 + 32))
    w = head.fc.weight.detach()
    assert torch.all(head.fc.bias == 0)
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)  # uniform's standard deviation
    torch.manual_seed(0)
    default = ImageHead(64, 32)  # PyTorch's default: bound 1/sqrt(in), a non-zero bias
    assert float(default.fc.bias.detach().abs().max()) > 0 and float(default.fc.weight.detach().abs().max()) <= 1 / 8


def test_config_key_reaches_the_head():
    cfg = load_config("configs/baselines/f30k_vse.yaml", ["model.region_dim=16", "model.embed_dim=8"])
    head = build_image_encoder(cfg["model"]).head
    assert torch.all(head.fc.bias == 0) and head.bn_padding
    cfg = load_config("configs/demo.yaml", ["model.region_dim=16", "model.embed_dim=8"])
    head = build_image_encoder(cfg["model"]).head
    assert float(head.fc.bias.detach().abs().max()) > 0 and not head.bn_padding
    with pytest.raises(ConfigError, match="model.image_fc_init"):
        load_config(None, ["model.image_fc_init=kaiming"])


def test_mlp_bn_padding_feeds_padded_rows_to_batchnorm():
    """Train mode, a padded batch: with bn_padding the MLP (its BatchNorm) sees every row, zeros included, as
    VSE-infinity's MLP; without, only the real regions. Real positions differ between the two."""
    torch.manual_seed(0)
    head = ImageHead(6, 8).train()
    regions = torch.randn(3, 5, 6).relu()
    lengths = torch.tensor([5, 2, 3])
    regions[torch.arange(5)[None, :] >= lengths[:, None]] = 0
    real = torch.arange(5)[None, :] < lengths[:, None]
    head.bn_padding = True
    everything = head.fc(regions) + head.mlp(regions.flatten(0, 1)).view(3, 5, 8)
    torch.testing.assert_close(head.local_features(regions, lengths), everything)
    head.bn_padding = False
    only_real = head.fc(regions)[real] + head.mlp(regions[real])
    ours = head.local_features(regions, lengths)
    torch.testing.assert_close(ours[real], only_real)
    assert float((ours[real] - everything[real]).detach().abs().max()) > 1e-3
