"""Small teachers shared by the synthetic-source tests."""

import torch
from torch import nn


def tiny_teacher(channels: int = 3, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A small CNN with BN whose running stats come from shifted, scaled noise (not 0/1)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, channels, 8, 8) * 1.5 + 0.3)
    return model.eval()


def tiny_source(cls, teacher: nn.Module | None = None, **kwargs):
    """A sample source of class ``cls`` on ``tiny_teacher()`` (10 classes, 3x8x8) by default."""
    teacher = teacher if teacher is not None else tiny_teacher()
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("image_shape", (3, 8, 8))
    return cls(teacher, **kwargs)
