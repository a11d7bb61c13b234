"""CIFAR ResNets (He et al. 2016, section 4.2): depth 6n+2, widths 16/32/64, option-A shortcuts.

Parameter names follow the widely shared CIFAR checkpoints (conv1, bn1, layer{1,2,3}.{i}.*,
linear) so those load without renaming. Every ReLU is its own ``nn.ReLU`` module, used once and
not in place, so module-swapping quantizers can put an activation quantizer after each one and
forward hooks see un-clobbered batch-norm outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
]

WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters).

    The padding is split evenly in front of and behind the input channels, matching the public
    checkpoints: which channels carry the identity matters for them to reproduce their accuracy.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        extra = out_channels - in_channels
        self.pad_front = extra // 2
        self.pad_back = extra - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"pad_front={self.pad_front}, pad_back={self.pad_back}"


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm; the residual sum goes through ``relu2``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = PadShortcut(in_channels, out_channels)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv -> three stages of ``blocks_per_stage`` blocks -> global average pool -> linear."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if blocks_per_stage < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"blocks_per_stage, num_classes and in_channels must be >= 1, got "
                f"{blocks_per_stage}, {num_classes}, {in_channels}"
            )
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.relu = nn.ReLU()
        self.layer1 = _make_stage(WIDTHS[0], WIDTHS[0], blocks_per_stage, stride=1)
        self.layer2 = _make_stage(WIDTHS[0], WIDTHS[1], blocks_per_stage, stride=2)
        self.layer3 = _make_stage(WIDTHS[1], WIDTHS[2], blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(WIDTHS[2], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs and linear (as in the paper), unit/zero batch-norm affine."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 for 32x32 inputs (0.27M parameters)."""
    return CifarResNet(3, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 for 32x32 inputs (0.46M parameters)."""
    return CifarResNet(5, num_classes, in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-44 for 32x32 inputs (0.66M parameters)."""
    return CifarResNet(7, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 for 32x32 inputs (0.85M parameters)."""
    return CifarResNet(9, num_classes, in_channels)
