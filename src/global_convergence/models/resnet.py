"""ResNet-18 ([K22]) and pre-activation ResNet-18 ([KS21]), CIFAR variant, softplus everywhere.

CIFAR variant: 3×3 stride-1 stem, no max pooling, four stages of two basic blocks (64, 128, 256,
512 channels), global average pooling to 512 features, then the output layer ``fc``.
"""
from __future__ import annotations

import torch
from torch import nn

from .analytic import SOFTPLUS_BETA, softplus

STAGE_WIDTHS = (64, 128, 256, 512)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _shortcut(cin: int, cout: int, stride: int, with_bn: bool) -> nn.Module:
    """Identity, or a 1×1 projection where the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout)) if with_bn else conv


class BasicBlock(nn.Module):
    """``σ(BN(conv(σ(BN(conv(x))))) + shortcut(x))`` with σ = softplus."""

    def __init__(self, cin: int, cout: int, stride: int, beta: float) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.act1 = softplus(beta)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride, with_bn=True)
        self.act2 = softplus(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block: ``conv(σ(BN(conv(σ(BN(x)))))) + shortcut(σ(BN(x)))``."""

    def __init__(self, cin: int, cout: int, stride: int, beta: float) -> None:
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(cin), softplus(beta)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), softplus(beta)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut = _shortcut(cin, cout, stride, with_bn=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        shortcut = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + shortcut


class _ResNet18(nn.Module):
    """Shared skeleton: stem, four stages of two blocks, pooling, ``fc``."""

    block: type[nn.Module]

    def __init__(self, in_channels: int, num_outputs: int, beta: float = SOFTPLUS_BETA) -> None:
        super().__init__()
        self.stem = self._stem(in_channels, beta)
        layers, cin = [], STAGE_WIDTHS[0]
        for stage, cout in enumerate(STAGE_WIDTHS):
            stride = 1 if stage == 0 else 2
            layers.append(nn.Sequential(self.block(cin, cout, stride, beta),
                                        self.block(cout, cout, 1, beta)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.head_norm = self._head_norm(cin, beta)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_outputs)

    def _stem(self, in_channels: int, beta: float) -> nn.Module:
        raise NotImplementedError

    def _head_norm(self, channels: int, beta: float) -> nn.Module:
        return nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.flatten(self.avgpool(self.head_norm(out))))


class ResNet18(_ResNet18):
    """Standard ResNet-18 (He et al. 2016) of [K22], BN after each convolution, CIFAR stem."""

    block = BasicBlock

    def _stem(self, in_channels: int, beta: float) -> nn.Module:
        return nn.Sequential(_conv3x3(in_channels, STAGE_WIDTHS[0]), nn.BatchNorm2d(STAGE_WIDTHS[0]),
                             softplus(beta))


class PreActResNet18(_ResNet18):
    """Pre-activation ResNet-18 (He et al. 2016b) of [KS21], CIFAR stem, final BN + σ."""

    block = PreActBlock

    def _stem(self, in_channels: int, beta: float) -> nn.Module:
        return _conv3x3(in_channels, STAGE_WIDTHS[0])

    def _head_norm(self, channels: int, beta: float) -> nn.Module:
        return nn.Sequential(nn.BatchNorm2d(channels), softplus(beta))
