"""ResNet-50/101/152 (He et al., CVPR 2016) in plain torch.nn, for grid features of raw images.

torchvision is not a dependency: its PyPI wheels carry CUDA kernels that do not load with the CPU build of
torch this project pins. The modules are named as torchvision names them (conv1, bn1, layer1..layer4 of
Bottleneck blocks with conv1/bn1/conv2/bn2/conv3/bn3 and downsample.0/.1, fc) and the stride sits on the 3x3
convolution as in torchvision's ResNet ("v1.5"), so a torchvision ResNet state dict (e.g. the ImageNet
weights of `torchvision.models.resnet152`) loads with strict key and shape checks.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .precomp import DataError

BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
GRID_DIM = 2048  # channels of layer4 (512 x Bottleneck expansion 4)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(64, blocks[0], 1)
        self.layer2 = self._layer(128, blocks[1], 2)
        self.layer3 = self._layer(256, blocks[2], 2)
        self.layer4 = self._layer(512, blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)  # kept so classifier weights load strictly
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _layer(self, planes: int, count: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride,
                                                 bias=False), nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 2048, H/32, W/32): layer4's feature map, the grid VSE-infinity pools (its ResnetFeatureExtractor)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.grid(x)), 1))


def grid_side(size: int) -> int:
    """Side of layer4's map for a size x size input: five halvings (conv1, maxpool, layer2-4), each ceil."""
    for _ in range(5):
        size = (size - 1) // 2 + 1
    return size


def build_resnet(arch: str) -> ResNet:
    if arch not in BLOCKS:
        raise ValueError(f"arch must be one of {sorted(BLOCKS)}, got {arch!r}")
    return ResNet(BLOCKS[arch])


def load_weights(model: ResNet, path: str | Path) -> None:
    """A torchvision-layout state dict (optionally under 'state_dict' or 'model', keys optionally prefixed
    'module.'); any missing, unexpected or misshapen key is a DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: weights file not found (a torchvision ResNet state dict, e.g. saved with "
                        f"torch.save(torchvision.models.resnet152(weights='IMAGENET1K_V1').state_dict(), ...) on a "
                        f"machine with network access)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unpickling-policy errors all mean: not a plain state dict
        raise DataError(f"{path}: cannot be read as a state dict ({type(err).__name__}: {err})") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise DataError(f"{path}: holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise DataError(f"{path}: not a torchvision-layout ResNet of this depth ({len(missing)} missing keys, first "
                        f"{missing[:3]}; {len(unexpected)} unexpected, first {unexpected[:3]})")
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        raise DataError(f"{path}: key {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model's is "
                        f"{tuple(own[wrong[0]].shape)} ({len(wrong)} such keys)")
    model.load_state_dict(state)
