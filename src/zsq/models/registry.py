"""Build a model from a name: CIFAR ResNets, torchvision classifiers, ``timm:NAME`` or
``pkg.mod:fn``."""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from zsq.errors import ZsqError
from zsq.models import cifar_resnet

logger = logging.getLogger(__name__)

__all__ = [
    "CIFAR_MODELS",
    "TIMM_PREFIX",
    "available_models",
    "create_model",
    "default_image_size",
    "input_channels",
    "is_timm_name",
]

TIMM_PREFIX = "timm:"
TIMM_EXTRA_HINT = "pip install 'zsq[vit]'"

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


def create_model(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build a randomly initialised classifier by name.

    The CIFAR names (``resnet20`` ...) win over torchvision's, which has no CIFAR ResNets but
    uses names like ``resnet18``; ``timm:NAME`` builds ``timm.create_model(NAME,
    pretrained=False, **model_kwargs)`` (never downloads); ``pkg.mod:fn`` imports and calls a
    user's factory. ``model_kwargs`` are passed to the factory as extra keyword arguments;
    ``num_classes``/``in_channels`` given here win over theirs, and where neither gives them
    they default to 10 and 3.
    """
    name, kwargs = name.strip(), dict(model_kwargs or {})
    if name.startswith(TIMM_PREFIX):
        return _create_timm_model(name[len(TIMM_PREFIX) :], num_classes, in_channels, kwargs)
    num_classes = kwargs.pop("num_classes", 10) if num_classes is None else num_classes
    in_channels = kwargs.pop("in_channels", 3) if in_channels is None else in_channels
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes", "in_channels")}
    _check_counts(num_classes, in_channels)
    if ":" in name:
        return _create_user_model(name, num_classes, in_channels, kwargs)
    if name.lower() in CIFAR_MODELS:
        counts = {"num_classes": num_classes, "in_channels": in_channels}
        return _call_with_kwargs(name, CIFAR_MODELS[name.lower()], counts, kwargs)
    if name.lower() in _torchvision_names():
        return _create_torchvision_model(name.lower(), num_classes, in_channels, kwargs)
    raise ZsqError(_unknown_name_message(name))


def is_timm_name(name: str | None) -> bool:
    """Whether ``name`` asks for a timm model (``timm:NAME``)."""
    return name is not None and name.strip().startswith(TIMM_PREFIX)


def _check_counts(num_classes: int, in_channels: int) -> None:
    if num_classes < 1 or in_channels < 1:
        raise ZsqError(
            f"num_classes and in_channels must be >= 1 (got {num_classes}, {in_channels}); "
            "pass positive values"
        )


def _call_with_kwargs(
    name: str, factory: Callable[..., Any], fixed: Mapping[str, Any], extra: Mapping[str, Any]
) -> Any:
    """``factory(**fixed, **extra)``; a TypeError there, with ``extra`` (the model_kwargs) given,
    is said as a bad model_kwargs error."""
    try:
        return factory(**{**fixed, **extra})
    except TypeError as exc:
        if not extra:
            raise
        raise _bad_kwargs_error(name, extra, exc) from exc


def _bad_kwargs_error(name: str, kwargs: Mapping[str, Any], exc: Exception) -> ZsqError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ZsqError(
        f"cannot build model {name!r} with model_kwargs {dict(kwargs)} ({reason}); fix the "
        "model_kwargs (given, or in the weights' .json sidecar)"
    )


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ZsqError(
            f"timm models need the timm package, which is not installed; {TIMM_EXTRA_HINT}"
        ) from exc
    return timm


def _create_timm_model(
    name: str, num_classes: int | None, in_channels: int | None, kwargs: dict[str, Any]
) -> nn.Module:
    """``timm.create_model(name, pretrained=False, ...)``: architecture only, never a download."""
    timm = _import_timm()
    if not name or not timm.is_model(name):
        raise ZsqError(_unknown_timm_message(timm, name))
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("in_chans", 3)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_channels is not None:
        kwargs["in_chans"] = in_channels
    _check_counts(kwargs["num_classes"], kwargs["in_chans"])
    if kwargs.pop("pretrained", False):
        logger.warning("ignoring pretrained=True in model_kwargs: zsq loads only the given weights")
    logger.debug("timm.create_model(%r, pretrained=False, **%s)", name, kwargs)
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise _bad_kwargs_error(TIMM_PREFIX + name, kwargs, exc) from exc


def _unknown_timm_message(timm: Any, name: str) -> str:
    close = difflib.get_close_matches(name.lower(), timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (
        f"unknown timm model {name!r}{hint}; pick a name from timm.list_models('*vit*') "
        "(or another pattern) and write it as timm:NAME"
    )


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _create_torchvision_model(
    name: str, num_classes: int, in_channels: int, kwargs: Mapping[str, Any]
) -> nn.Module:
    import torchvision

    if in_channels != 3:
        raise ZsqError(
            f"torchvision model {name!r} takes 3 input channels, not {in_channels}; use a CIFAR "
            f"ResNet ({', '.join(sorted(CIFAR_MODELS))}) or your own 'pkg.mod:fn' factory for "
            "other channel counts"
        )
    fixed = {"name": name, "weights": None, "num_classes": num_classes}
    return _call_with_kwargs(name, torchvision.models.get_model, fixed, kwargs)


def _create_user_model(
    spec: str, num_classes: int, in_channels: int, extra: Mapping[str, Any]
) -> nn.Module:
    """Import ``pkg.mod:fn`` and call it, passing num_classes/in_channels only if it takes them
    (``extra``, the model_kwargs, always)."""
    factory = _import_factory(spec)
    wanted = {"num_classes": num_classes, "in_channels": in_channels}
    counts = _supported_kwargs(factory, wanted)
    logger.debug("calling %s(**%s, **%s)", spec, counts, dict(extra))
    try:
        model = _call_with_kwargs(spec, factory, counts, extra)
    except ZsqError:
        raise
    except Exception as exc:  # the user's code failed: say where, in one line
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise ZsqError(
            f"model factory {spec} raised {type(exc).__name__}: {reason}; fix the factory"
        ) from exc
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
        "any torchvision classification model name (e.g. resnet18, mobilenet_v2), "
        "'timm:NAME' for a timm model, or 'package.module:function' for your own model"
    )
