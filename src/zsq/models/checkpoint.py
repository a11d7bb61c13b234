"""Loading teacher weights safely, and the metadata (classes, channels, normalisation) beside them.

Weights come from ``.safetensors`` or from ``torch.load(weights_only=True)``; a full pickle
(which can run arbitrary code) is read only when the caller passes ``trust_checkpoint=True``.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsq.errors import ConfigError, ZsqError
from zsq.models.registry import create_model, is_timm_name

logger = logging.getLogger(__name__)

__all__ = ["ModelMeta", "load_state_dict", "load_teacher", "load_weights", "read_sidecar"]

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
PREFIXES_TO_STRIP = ("module.",)
MAX_LISTED_KEYS = 10


# model_kwargs keys that also say what the model expects (timm's names for them)
KWARG_FIELDS = {"num_classes": "num_classes", "in_channels": "in_chans", "image_size": "img_size"}
SHAPE_HINT = "give the checkpoint's «num_classes» / «in_channels» (or fix the model name)"
KWARGS_HINT = "fix model_kwargs (as given, or in the weights' .json sidecar) to match the weights"


@dataclass(frozen=True)
class ModelMeta:
    """What a teacher expects: class count, input channels, normalisation and input size.

    Fields are ``None`` when unknown (a sidecar may leave some out); ``load_teacher`` resolves all
    but ``image_size``, which stays ``None`` unless given (then the model's usual size applies:
    :func:`zsq.models.default_image_size`). ``model`` (the model's name) and ``model_kwargs``
    (extra keyword arguments of its factory, e.g. a timm ViT's ``embed_dim``) say how to build
    it, and ``weights`` names the file it was loaded from; they are left out of comparisons, which
    are about what the model expects.
    """

    num_classes: int | None = None
    in_channels: int | None = None
    normalize_mean: tuple[float, ...] | None = None
    normalize_std: tuple[float, ...] | None = None
    image_size: int | None = None
    model: str | None = field(default=None, compare=False)
    model_kwargs: dict[str, Any] | None = field(default=None, compare=False)
    weights: str | None = field(default=None, compare=False)  # the file it was loaded from


def load_weights(
    model: nn.Module,
    path: str | Path,
    trust_checkpoint: bool = False,
    *,
    fix_hint: str = SHAPE_HINT,
) -> None:
    """Load a checkpoint into ``model`` strictly, with errors that say which tensors disagree
    (ending with ``fix_hint``: how to build the model that fits)."""
    state = load_state_dict(path, trust_checkpoint=trust_checkpoint)
    _check_compatible(model, state, Path(path), fix_hint)
    model.load_state_dict(state, strict=False)  # strictness checked above, modulo BN counters
    logger.info("loaded %d tensors from %s", len(state), path)


def _existing_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ZsqError(f"weights file {path} not found; check the path")
    return path


def load_state_dict(path: str | Path, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``name -> tensor`` dict (``module.`` prefix removed).

    Checked on the way: the file's sha256 against the one its ``.json`` sidecar records (when
    it records one), and every floating-point tensor finite. A checkpoint holding several state
    dicts (``model`` and ``ema``) gives the one its sidecar's ``state_dict_key`` names, else the
    first of ``state_dict``, ``model_state_dict``, ``model``, and says which."""
    path = _existing_file(path)
    _check_sidecar_digest(path)
    if path.suffix == ".safetensors":
        obj: Any = _read_safetensors(path)
    else:
        obj = _read_torch_file(path, trust_checkpoint)
    if isinstance(obj, Mapping):
        obj = _chosen_state_dict(obj, path)
    state = _strip_prefixes(_extract_state_dict(obj, path))
    _check_finite(state, path)
    return state


EMA_KEYS = ("ema", "model_ema", "state_dict_ema", "ema_state_dict")


def _chosen_state_dict(obj: Mapping[str, Any], path: Path) -> Any:
    """The state dict the sidecar's ``state_dict_key`` names; else ``obj`` as it is, with a
    warning when it also holds EMA weights that would be ignored."""
    key = _sidecar_field(path, "state_dict_key")
    nested = [k for k in (*STATE_DICT_KEYS, *EMA_KEYS) if isinstance(obj.get(k), Mapping)]
    if key is not None:
        if key not in nested:
            raise ZsqError(
                f"{sidecar_path(path)} asks for state_dict_key {key!r}, but {path} holds "
                f"{', '.join(nested) or 'no nested state dict'}; fix the sidecar"
            )
        return obj[key]
    ema = [k for k in nested if k in EMA_KEYS]
    used = next((k for k in STATE_DICT_KEYS if k in nested), None)
    if ema and used is not None:
        logger.warning(
            "%s holds both %r and %r weights; using %r (set \"state_dict_key\": %r in %s to "
            "use the other)", path, used, ema[0], used, ema[0], sidecar_path(path).name,
        )  # fmt: skip
    return obj


def _sidecar_field(path: Path, key: str) -> Any:
    sidecar = sidecar_path(path)
    try:
        raw = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # read_sidecar reports an unreadable sidecar
    return raw.get(key) if isinstance(raw, dict) else None


def _check_sidecar_digest(path: Path) -> None:
    expected = _sidecar_field(path, "sha256")
    if not isinstance(expected, str):
        return
    from zsq.io import sha256_file

    if sha256_file(path) != expected.lower():
        raise ZsqError(
            f"weights file {path} does not match the sha256 its sidecar {sidecar_path(path).name} "
            "records (damaged, truncated or replaced); restore the file, or remove 'sha256' "
            "from the sidecar if the new weights are meant"
        )


# Tensors that may hold +-inf on purpose (an attention mask's -inf); every other tensor of a
# teacher must be finite. NaN is refused everywhere.
_MAY_HOLD_INF = "mask"


def _check_finite(state: Mapping[str, torch.Tensor], path: Path) -> None:
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        must_be_finite = _MAY_HOLD_INF not in name.rsplit(".", 1)[-1].lower()
        bad = ~torch.isfinite(tensor) if must_be_finite else torch.isnan(tensor)
        if bool(bad.any()):
            what = "NaN or infinite value(s)" if must_be_finite else "NaN value(s)"
            raise ZsqError(
                f"weights file {path}: tensor {name!r} holds {int(bad.sum())} {what}; "
                "a teacher must be finite: check the training run that saved it"
            )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    from zsq.io import read_safetensors

    try:
        return read_safetensors(path)[0]
    except (SafetensorError, OSError, ValueError) as exc:
        raise ZsqError(
            f"cannot read weights file {path}: not a valid safetensors file ({exc}); re-export it "
            "or check the download is complete"
        ) from exc


def _read_torch_file(path: Path, trust_checkpoint: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as exc:
        if not trust_checkpoint and "global" in str(exc).lower():
            raise ConfigError(
                f"weights file {path} is a pickle that needs arbitrary classes to load "
                f"({_unsupported_global(exc)}), which can run code; pass «trust_checkpoint=True» "
                "only if you trust where it came from, or re-save it as "
                "a state_dict or .safetensors"
            ) from exc
        raise _corrupt_file_error(path, exc) from exc
    except ImportError as exc:  # only reachable when trusted: the pickle names a missing module
        raise ZsqError(
            f"weights file {path} needs {exc.name or 'a module'!r} to unpickle ({exc}); install it "
            "or put it on PYTHONPATH, or re-save the checkpoint as a state_dict"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - an unpickler fed garbage raises anything (KeyError...)
        raise _corrupt_file_error(path, exc) from exc


def _unsupported_global(exc: Exception) -> str:
    for line in str(exc).splitlines():
        if "global" in line.lower():
            return line.strip().split(" was not")[0].replace("WeightsUnpickler error: ", "")
    return "unsupported global"


def _corrupt_file_error(path: Path, exc: Exception) -> ZsqError:
    return ZsqError(
        f"cannot read weights file {path}: not a valid torch checkpoint ({_short_reason(exc)}); "
        "check the file is complete, or use a .safetensors / .pt / .pth / .th file"
    )


def _short_reason(exc: Exception) -> str:
    """One line of why torch.load failed, without its multi-paragraph weights_only preamble."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    specific = [line for line in lines if line.startswith("Unsupported")]
    if specific:
        return specific[0][:200]
    if lines and not lines[0].startswith("Weights only load failed"):
        return lines[0][:200]
    return type(exc).__name__


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensors in what was saved: a state_dict, a wrapper dict, or a whole module."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], (Mapping, nn.Module)):
                return _extract_state_dict(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return dict(tensors)
        raise ZsqError(
            f"weights file {path} holds a dict without a state_dict (keys: "
            f"{_preview(list(obj))}); save model.state_dict() or a dict with a 'state_dict' key"
        )
    raise ZsqError(
        f"weights file {path} holds a {type(obj).__name__}, not a state_dict; save "
        "model.state_dict() instead"
    )


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` that DataParallel/DistributedDataParallel put before every name."""
    for prefix in PREFIXES_TO_STRIP:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _check_compatible(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, fix_hint: str
) -> None:
    expected = model.state_dict()
    # Old checkpoints predate BatchNorm's num_batches_tracked counter; it does not affect eval.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ConfigError(
            f"weights file {path} does not match the model: missing keys {_preview(missing)}, "
            f"unexpected keys {_preview(unexpected)}; {fix_hint}"
        )
    for key in expected:  # the model's order: the first mismatch is the earliest layer's
        tensor = state.get(key)
        if tensor is not None and tensor.shape != expected[key].shape:
            raise ConfigError(
                f"weights file {path}: tensor {key!r} has shape {tuple(tensor.shape)} in the file "
                f"but {tuple(expected[key].shape)} in the model; {fix_hint}"
            )


def _preview(keys: Sequence[str]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = f" ... (+{len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return f"[{shown}{more}]"


def sidecar_path(weights_path: str | Path) -> Path:
    """``dir/name.pt`` -> ``dir/name.json``: where a checkpoint's metadata lives."""
    return Path(weights_path).expanduser().with_suffix(".json")


def read_sidecar(weights_path: str | Path) -> ModelMeta | None:
    """Read the JSON beside a checkpoint (num_classes, in_channels, normalize_mean/std,
    image_size, model, model_kwargs), if any.

    ``model_kwargs`` may stand in for the first three (timm's ``num_classes``, ``in_chans``,
    ``img_size``); the top-level fields win where both are given.
    """
    path = sidecar_path(weights_path)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZsqError(f"cannot read model sidecar {path}: {exc}; fix or delete the file") from exc
    if not isinstance(raw, dict):
        raise ZsqError(f"model sidecar {path} must hold a JSON object; fix or delete the file")
    kwargs = _optional_kwargs(raw, path)
    meta = ModelMeta(
        num_classes=_optional_int(raw, "num_classes", path),
        in_channels=_optional_int(raw, "in_channels", path),
        normalize_mean=_optional_floats(raw, "normalize_mean", path),
        normalize_std=_optional_floats(raw, "normalize_std", path),
        image_size=_optional_int(raw, "image_size", path),
        model=_optional_name(raw, path),
        model_kwargs=kwargs,
    )
    return _fill(meta, meta_from_kwargs(kwargs))


def _optional_name(raw: Mapping[str, Any], path: Path) -> str | None:
    """The sidecar's model name, without a trailing note in parentheses: ``"resnet20 (CIFAR,
    option-A shortcut)"`` names ``resnet20`` (model names hold no spaces)."""
    value = raw.get("model")
    if value is None:
        return None
    name = value.split("(", 1)[0].strip() if isinstance(value, str) else ""
    if not name or " " in name:
        raise ZsqError(f"model sidecar {path}: 'model' must be a model name, got {value!r}")
    return name


def _optional_kwargs(raw: Mapping[str, Any], path: Path) -> dict[str, Any] | None:
    value = raw.get("model_kwargs")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ZsqError(
            f"model sidecar {path}: 'model_kwargs' must be a JSON object of keyword arguments, "
            f"got {value!r}"
        )
    return dict(value)


def meta_from_kwargs(kwargs: Mapping[str, Any] | None) -> ModelMeta:
    """The class count, channels and (square) input size that model_kwargs name, if any."""
    found: dict[str, int] = {}
    for meta_field, key in KWARG_FIELDS.items():
        value = (kwargs or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            found[meta_field] = value
    return ModelMeta(**found)


def _optional_int(raw: Mapping[str, Any], key: str, path: Path) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ZsqError(f"model sidecar {path}: {key!r} must be a positive integer, got {value!r}")
    return value


def _optional_floats(raw: Mapping[str, Any], key: str, path: Path) -> tuple[float, ...] | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(_is_number(v) for v in value):
        raise ZsqError(f"model sidecar {path}: {key!r} must be a list of numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_teacher(
    name: str | None,
    weights: str | Path | None = None,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    normalize_mean: Sequence[float] | None = None,
    normalize_std: Sequence[float] | None = None,
    image_size: int | None = None,
    trust_checkpoint: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, ModelMeta]:
    """Build ``name``, load ``weights`` and return it in eval mode with its resolved metadata.

    Explicit arguments override the sidecar JSON next to the weights; what neither gives falls
    back to 10 classes, 3 channels and no normalisation (mean 0, std 1), with a warning for the
    latter because a wrong normalisation silently costs accuracy. ``name`` may be None when the
    sidecar names the model (``"model": "timm:vit_tiny_patch16_224"``); ``model_kwargs`` are
    merged over the sidecar's (a timm model is built from them, e.g. its ``embed_dim``).
    """
    if weights is not None:
        weights = _existing_file(weights)  # fail on a bad path before anything else is said
    sidecar = (read_sidecar(weights) if weights is not None else None) or ModelMeta()
    name = _model_name(name, sidecar, weights)
    kwargs = {**(sidecar.model_kwargs or {}), **(model_kwargs or {})}
    explicit = ModelMeta(
        num_classes=num_classes,
        in_channels=in_channels,
        normalize_mean=_as_tuple(normalize_mean),
        normalize_std=_as_tuple(normalize_std),
        image_size=image_size,
        model=name,
        model_kwargs=kwargs or None,
    )
    meta = resolve_meta(_fill(explicit, meta_from_kwargs(model_kwargs)), sidecar)
    model = create_model(
        name, num_classes=meta.num_classes, in_channels=meta.in_channels, model_kwargs=kwargs
    )
    if weights is None:
        logger.warning("no weights given for teacher %r: it is randomly initialised", name)
    else:
        hint = KWARGS_HINT if kwargs or is_timm_name(name) else SHAPE_HINT
        load_weights(model, weights, trust_checkpoint=trust_checkpoint, fix_hint=hint)
    if normalize_mean is None and normalize_std is None and not sidecar.normalize_mean:
        logger.warning(
            "no input normalisation given: using mean 0, std 1; give normalize_mean/"
            "normalize_std or add them to the checkpoint's .json sidecar"
        )
    model.eval()
    return model, replace(meta, weights=str(weights) if weights is not None else None)


MAX_IMAGE_SIZE = 4096  # a side; one float32 RGB image is then 200 MB, its activations far more


def check_image_size(size: int) -> None:
    """An input side zsq can work with: positive, and not so large that the first forward
    exhausts memory (a typo such as 22400 for 224)."""
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise ConfigError(
            f"image size {size} is outside 1..{MAX_IMAGE_SIZE}; give the model's input side "
            "(«image_size», given or in the weights' .json sidecar)"
        )


def _model_name(name: str | None, sidecar: ModelMeta, weights: Path | None) -> str:
    """The explicit name, else the one the sidecar gives."""
    if name is not None and name.strip():
        if sidecar.model is not None and sidecar.model != name.strip():
            logger.warning(
                "building %r as asked, though the weights' sidecar names %r", name, sidecar.model
            )
        return name.strip()
    if sidecar.model is None:
        where = f"the sidecar of {weights} names none" if weights else "no weights were given"
        raise ConfigError(
            f'no model name given and {where}; give «model» NAME (or add "model": NAME to the '
            "weights' .json sidecar)"
        )
    return sidecar.model


def _fill(meta: ModelMeta, defaults: ModelMeta) -> ModelMeta:
    """``meta`` with its unknown class count, channels and image size taken from ``defaults``."""
    return replace(
        meta,
        num_classes=_first(meta.num_classes, defaults.num_classes),
        in_channels=_first(meta.in_channels, defaults.in_channels),
        image_size=_first(meta.image_size, defaults.image_size),
    )


def resolve_meta(explicit: ModelMeta, sidecar: ModelMeta) -> ModelMeta:
    """Merge explicit values over the sidecar's, fill defaults and check the lengths agree."""
    num_classes = _first(explicit.num_classes, sidecar.num_classes, 10)
    in_channels = _first(explicit.in_channels, sidecar.in_channels, 3)
    mean = _first(explicit.normalize_mean, sidecar.normalize_mean, None)
    std = _first(explicit.normalize_std, sidecar.normalize_std, None)
    mean = _per_channel(mean or (0.0,), in_channels, "normalize_mean")
    std = _per_channel(std or (1.0,), in_channels, "normalize_std")
    if any(s <= 0 for s in std):
        raise ConfigError(f"«normalize_std» must be positive, got {std}; fix it")
    image_size = _first(explicit.image_size, sidecar.image_size)
    if image_size is not None:
        check_image_size(image_size)
    model = _first(explicit.model, sidecar.model)
    kwargs = {**(sidecar.model_kwargs or {}), **(explicit.model_kwargs or {})}
    return ModelMeta(num_classes, in_channels, mean, std, image_size, model, kwargs or None)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _as_tuple(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def _per_channel(values: tuple[float, ...], channels: int, what: str) -> tuple[float, ...]:
    """One value per channel; a single value is repeated (e.g. ``--normalize-mean 0.5``)."""
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    raise ZsqError(
        f"{what} has {len(values)} values but the model has {channels} input channels; give one "
        "value per channel (or a single value for all)"
    )
