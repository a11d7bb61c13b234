"""What a teacher is made of: BatchNorm layers that remember their training data, timm attention
modules, a vision transformer's token layout.

Sample sources and methods declare what they need of a teacher (``"batchnorm"``, ``"attention"``);
this module answers whether a model has it and words the refusal when it has not.
"""

from __future__ import annotations

from torch import nn

from zsq.errors import ConfigError
from zsq.quant.attention import attention_modules, timm_attention_class

NEEDS = ("batchnorm", "attention")
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers that carry running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BATCHNORMS) and m.running_mean is not None and m.running_var is not None
    ]


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` holds attention modules whose maps zsq can read (timm's, or zsq's
    quantized ones)."""
    if attention_modules(model):
        return True
    attention_cls = timm_attention_class()
    return attention_cls is not None and any(type(m) is attention_cls for m in model.modules())


def vit_layout(model: nn.Module) -> tuple[int | None, tuple[int, int] | None]:
    """A timm ViT's prefix-token count and patch grid (None where the model does not say)."""
    prefix = getattr(model, "num_prefix_tokens", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    grid = (int(grid[0]), int(grid[1])) if grid is not None else None
    return (int(prefix) if prefix is not None else None), grid


def has(model: nn.Module, need: str | None) -> bool:
    """Whether ``model`` offers ``need`` (None: nothing is needed)."""
    if need is None:
        return True
    if need == "batchnorm":
        return bool(batchnorm_layers(model))
    if need == "attention":
        return has_attention(model)
    raise ValueError(f"unknown teacher need {need!r}; one of {NEEDS}")


def require(model: nn.Module, need: str | None, what: str, instead: str = "") -> None:
    """A one-line error when ``model`` lacks ``need``: ``what`` (e.g. '«method» gdfq', an option
    marked as :class:`~zsq.errors.ConfigError` marks them) needs it; ``instead`` (e.g. 'sources
    that work for CNNs: ...') ends the message."""
    if has(model, need):
        return
    name = type(model).__name__
    if need == "batchnorm":
        message = (
            f"{what} needs BatchNorm running statistics and {name} has no BatchNorm layer "
            "(fused into the convolutions?)"
        )
    else:
        message = (
            f"{what} needs a vision transformer with timm attention modules and {name} has none"
        )
    raise ConfigError(message + (f"; {instead}" if instead else ""))
