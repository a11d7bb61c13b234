"""The units a reconstruction optimises one after the other: residual blocks where the model has
them, single layers elsewhere (BRECQ's blocks, Genie's reference list of block classes).

A unit is found by its class name, so a model's own classes need no import: the CIFAR and
torchvision ResNets' ``BasicBlock``/``Bottleneck``, MobileNetV2's and MNASNet's
``InvertedResidual``, RegNet's ``ResBottleneckBlock``, timm's transformer ``Block``, and any name
a user adds. The outermost match wins; every quantized Conv2d/Linear outside a block is a unit of
its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from zsq.errors import ConfigError
from zsq.quant.modules import QuantConv2d, QuantLinear

BLOCK_CLASSES = (
    "BasicBlock",  # CIFAR and torchvision ResNets
    "Bottleneck",  # torchvision ResNets
    "InvertedResidual",  # MobileNetV2, MNASNet
    "ResBottleneckBlock",  # RegNet
    "Block",  # timm vision transformers
)
_LAYERS = (QuantConv2d, QuantLinear, nn.Conv2d, nn.Linear)


def find_blocks(model: nn.Module, extra: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) of every reconstruction unit of ``model``, in module order: the outermost
    module whose class name is a known block (or one of ``extra``), and every Conv2d/Linear not
    inside one."""
    _check_classes(model, extra)
    names = set(BLOCK_CLASSES) | set(extra)
    units: list[tuple[str, nn.Module]] = []
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names or isinstance(module, _LAYERS):
            units.append((name, module))
            inside.update(id(m) for m in module.modules())
    return units


def _check_classes(model: nn.Module, extra: Sequence[str]) -> None:
    present = list(dict.fromkeys(type(m).__name__ for m in model.modules()))
    missing = [name for name in extra if name not in present]
    if missing:
        raise ConfigError(
            f"«blocks» {', '.join(missing)}: no module of that class in the model; its classes "
            f"are {', '.join(present[:20])}{', ...' if len(present) > 20 else ''}"
        )


def describe_blocks(units: Sequence[tuple[str, nn.Module]]) -> str:
    """'9 BasicBlock, 2 layers': what a reconstruction went through, for the log and report."""
    counts: dict[str, int] = {}
    for _, module in units:
        kind = "layers" if isinstance(module, _LAYERS) else type(module).__name__
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())
