"""Tiny model factories imported by name in the tests (``_user_model:tiny``)."""

from torch import nn


def tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A factory that accepts both keyword arguments zsq passes."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


def tiny_fixed() -> nn.Module:
    """A factory without arguments: zsq must call it without num_classes/in_channels."""
    return tiny(num_classes=2, in_channels=3)


def not_a_model(num_classes: int = 10) -> str:
    return "oops"


def failing(num_classes: int = 10) -> nn.Module:
    """A factory with a bug of its own."""
    raise RuntimeError("boom")
