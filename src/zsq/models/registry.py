"""Build a model from a name: CIFAR ResNets, torchvision classifiers, or ``pkg.mod:fn``."""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Callable

from torch import nn

from zsq.errors import ZsqError
from zsq.models import cifar_resnet

logger = logging.getLogger(__name__)

__all__ = [
    "CIFAR_MODELS",
    "available_models",
    "create_model",
    "default_image_size",
    "input_channels",
]

CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": cifar_resnet.resnet20,
    "resnet32": cifar_resnet.resnet32,
    "resnet44": cifar_resnet.resnet44,
    "resnet56": cifar_resnet.resnet56,
}


CIFAR_IMAGE_SIZE = 32
IMAGENET_IMAGE_SIZE = 224  # torchvision classifiers, and the guess for a user's own model


def default_image_size(name: str) -> int:
    """The input size a model of this name usually takes (32 for the CIFAR ResNets, else 224)."""
    return CIFAR_IMAGE_SIZE if name.strip().lower() in CIFAR_MODELS else IMAGENET_IMAGE_SIZE


def input_channels(model: nn.Module) -> int | None:
    """Channels the model's first layer takes, when that layer is a convolution (else None)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
        if isinstance(module, nn.Linear):
            return None
    return None


def available_models() -> list[str]:
    """Names ``create_model`` accepts besides ``pkg.mod:fn``: CIFAR ResNets, then torchvision's."""
    return sorted(CIFAR_MODELS) + [n for n in _torchvision_names() if n not in CIFAR_MODELS]


def create_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a randomly initialised classifier by name.

    The CIFAR names (``resnet20`` ...) win over torchvision's, which has no CIFAR ResNets but
    uses names like ``resnet18``; ``pkg.mod:fn`` imports and calls a user's factory.
    """
    if num_classes < 1 or in_channels < 1:
        raise ZsqError(
            f"num_classes and in_channels must be >= 1 (got {num_classes}, {in_channels}); "
            "pass positive values"
        )
    name = name.strip()
    if ":" in name:
        return _create_user_model(name, num_classes, in_channels)
    if name.lower() in CIFAR_MODELS:
        return CIFAR_MODELS[name.lower()](num_classes=num_classes, in_channels=in_channels)
    if name.lower() in _torchvision_names():
        return _create_torchvision_model(name.lower(), num_classes, in_channels)
    raise ZsqError(_unknown_name_message(name))


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _create_torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    if in_channels != 3:
        raise ZsqError(
            f"torchvision model {name!r} takes 3 input channels, not {in_channels}; use a CIFAR "
            f"ResNet ({', '.join(sorted(CIFAR_MODELS))}) or your own 'pkg.mod:fn' factory for "
            "other channel counts"
        )
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _create_user_model(spec: str, num_classes: int, in_channels: int) -> nn.Module:
    """Import ``pkg.mod:fn`` and call it, passing num_classes/in_channels only if it takes them."""
    factory = _import_factory(spec)
    kwargs = _supported_kwargs(factory, {"num_classes": num_classes, "in_channels": in_channels})
    logger.debug("calling %s(**%s)", spec, kwargs)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ZsqError(
            f"{spec} returned {type(model).__name__}, not a torch.nn.Module; make the factory "
            "return the model"
        )
    return model


def _import_factory(spec: str) -> Callable[..., object]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ZsqError(f"model {spec!r} is not of the form 'package.module:function'; fix the name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ZsqError(
            f"cannot import module {module_name!r} for model {spec!r} ({exc}); make sure it is "
            "installed or on PYTHONPATH"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ZsqError(
            f"module {module_name!r} has no callable {attr!r}; check the function name after ':'"
        )
    return factory


def _supported_kwargs(factory: Callable[..., object], wanted: dict[str, int]) -> dict[str, int]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins / C extensions without a signature
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(wanted)
    dropped = {k: v for k, v in wanted.items() if k not in params}
    if dropped:
        logger.warning(
            "model factory %s does not accept %s; building it without them, so make sure its "
            "defaults match your weights",
            getattr(factory, "__qualname__", factory),
            dropped,
        )
    return {k: v for k, v in wanted.items() if k in params}


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), available_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (
        f"unknown model {name!r}{hint}; use a CIFAR ResNet ({', '.join(sorted(CIFAR_MODELS))}), "
        "any torchvision classification model name (e.g. resnet18, mobilenet_v2), or "
        "'package.module:function' for your own model"
    )
