"""Named training presets as data. Every field can be overridden (``--set field=value``).

``paper-cifar`` and ``paper-imagenet`` follow the GDFQ/AIT papers and reference code
(../shared/REFERENCE.md); ``short`` (a ResNet-20 run in 5-6 minutes on 2 idle CPU cores) and
``demo`` (the digits demo, seconds) are the same schedule shrunk for a CPU, with the lr/rho
milestones kept near 1/3, 1/2, 3/4 of training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields, replace
from typing import Any

from zsq.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "rmsprop")
GI_COUNTS = ("codes", "levels")  # what "an integer weight changed" compares (see inundation.py)
GI_SEARCHES = ("reference", "nearest-above")  # kappa search rule (see inundation.py)
LOSS_MODES = ("ce+kl", "kl", "ce")  # student loss: the rows of the paper's Table 2
KL_REDUCTIONS = ("mean", "batchmean")  # mean: the reference's


@dataclass(frozen=True)
class Bounds:
    """The interval a numeric recipe field lies in; ``why`` says what a value outside breaks."""

    low: float
    high: float | None = None
    low_included: bool = True
    high_included: bool = False
    why: str = ""

    def contains(self, value: float) -> bool:
        """Written so that NaN is outside every interval."""
        above = value > self.low or (self.low_included and value == self.low)
        if self.high is None:
            return above
        return above and (value < self.high or (self.high_included and value == self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>=' if self.low_included else '>'} {self.low}"
        left, right = "[" if self.low_included else "(", "]" if self.high_included else ")"
        return f"in {left}{self.low}, {self.high}{right}"


def _at_least(low: int, why: str = "") -> Bounds:
    return Bounds(low, why=why)


def _above(low: int, why: str = "") -> Bounds:
    return Bounds(low, low_included=False, why=why)


# The valid range of every numeric field (of each entry of a tuple; an optional field's when it
# is on), from the code that uses it. A new numeric field needs a row (tests/test_recipes.py).
FIELD_BOUNDS: dict[str, Bounds] = {
    "epochs": _at_least(1),
    "iters_per_epoch": _at_least(1),
    "batch_size": _at_least(1),
    "gen_warmup_epochs": _at_least(0),
    "act_calib_epochs": _at_least(1, "activation ranges need observing"),
    # a milestone at or past `epochs` never fires: a shortened run keeps the preset's
    "lr_milestones": _at_least(0, "epoch numbers"),
    "lr_gamma": Bounds(0, 1, low_included=False, high_included=True, why="1 keeps the lr"),
    "student_lr": _above(0),
    "lr_mult": _above(0),
    "momentum": Bounds(0, 1, low_included=False, why="the student's SGD is Nesterov's"),
    "weight_decay": _at_least(0),
    "temperature": _above(0, "the logits are divided by it"),
    "rho": Bounds(0, 1, low_included=False),
    "gi_warmup_epochs": _at_least(0),
    "max_kappa": _at_least(1, "a cap on gradient multipliers"),
    "gen_lr": _above(0),
    "bns_weight": _at_least(0),
    "eval_every": _at_least(1),
    "probe_batch_size": _at_least(1),
    "analyze_every": _at_least(1),
    "attn_distill": _at_least(0),
}
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": OPTIMIZERS,
    "loss": LOSS_MODES,
    "kl_reduction": KL_REDUCTIONS,
    "gi_count": GI_COUNTS,
    "gi_search": GI_SEARCHES,
}


@dataclass(frozen=True)
class DistillRecipe:
    """Schedule and hyperparameters of generator + student distillation."""

    name: str = "custom"
    epochs: int = 400
    iters_per_epoch: int = 200
    batch_size: int = 200
    gen_warmup_epochs: int = 4  # generator-only epochs; the student observes activation ranges
    act_calib_epochs: int = 4  # EMA activation-range updates during these epochs, then frozen
    lr_milestones: tuple[int, ...] = (100, 200, 300)  # lr (all) and rho x gamma at these epochs
    lr_gamma: float = 0.1
    # student
    optimizer: str = "sgd"
    student_lr: float = 1e-4
    lr_mult: float = 1.0  # Table 2's 'high lr' row multiplies the student lr
    momentum: float = 0.9  # SGD Nesterov momentum
    weight_decay: float = 0.0  # every config of the AIT repository (original GDFQ: 1e-4)
    loss: str = "ce+kl"
    temperature: float = 20.0
    kl_reduction: str = "mean"
    # gradient inundation
    gi: bool = False
    rho: float = 1e-3
    gi_warmup_epochs: int = 1  # kappa <= 128 for these epochs after the generator warm-up
    max_kappa: float = 2.0**16
    gi_count: str = "codes"  # codes q (paper Eq. 11, reference) or levels q + z
    gi_search: str = "reference"  # the reference's doubling + bisection, or nearest-above
    # generator
    gen_lr: float = 1e-3
    bns_weight: float = 0.1
    # measurement
    eval_every: int = 1  # epochs between evaluations on --eval-data (the last epoch always)
    probe_batch_size: int = 256  # fixed synthetic batch for KL-to-teacher tracking
    # every N-th student step: CE/KL gradient cosine and the epoch-mean gradient (paper Figs.
    # 1, 3a, 5b), measured beside the update, never changing it; None: off
    analyze_every: int | None = None
    # MimiQ's head-wise structural attention distillation (ViTs): its weight beside the output
    # loss; None: off (the paper uses 10)
    attn_distill: float | None = None

    def __post_init__(self) -> None:
        for name, choices in FIELD_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; use one of {choices}")
        for name, bounds in FIELD_BOUNDS.items():
            _check_bounds(name, getattr(self, name), bounds)
        if self.gen_warmup_epochs >= self.epochs:
            raise ConfigError(
                f"gen_warmup_epochs={self.gen_warmup_epochs} leaves no student epochs out of "
                f"epochs={self.epochs}; lower it or raise epochs"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_bounds(name: str, value: Any, bounds: Bounds) -> None:
    """A one-line error naming the field when ``value`` (or an entry of a tuple) is outside
    ``bounds``; None is an optional field that is off."""
    if value is None:
        return
    entries = value if isinstance(value, tuple) else (value,)
    try:
        inside = all(bounds.contains(v) for v in entries)
    except TypeError:  # a non-number given to the constructor directly
        inside = False
    if inside:
        return
    default = next(f.default for f in fields(DistillRecipe) if f.name == name)
    subject = ": each entry" if isinstance(value, tuple) else ""
    range_text = f"{bounds}, or off" if default is None else str(bounds)
    why = f" ({bounds.why})" if bounds.why else ""
    example = "" if default is None else f"; e.g. {name}={_as_text(default)}"
    raise ConfigError(
        f"recipe field {name}={_as_text(value)}{subject} must be {range_text}{why}{example}"
    )


def _as_text(value: Any) -> str:
    """A value as ``--set`` takes it (tuples comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


RECIPES: dict[str, DistillRecipe] = {
    "paper-cifar": DistillRecipe(name="paper-cifar"),
    "paper-imagenet": DistillRecipe(
        name="paper-imagenet",
        batch_size=16,
        gen_warmup_epochs=50,
        student_lr=1e-6,
        rho=1e-4,
    ),
    "short": DistillRecipe(
        name="short",
        epochs=22,
        iters_per_epoch=25,
        batch_size=32,
        gen_warmup_epochs=2,
        act_calib_epochs=2,
        lr_milestones=(7, 12, 17),
        eval_every=22,
    ),
    "demo": DistillRecipe(
        name="demo",
        epochs=12,
        iters_per_epoch=20,
        batch_size=64,
        gen_warmup_epochs=2,
        act_calib_epochs=2,
        lr_milestones=(5, 8, 10),
        eval_every=12,
        probe_batch_size=128,
    ),
}

# AIT's changes on top of any base method (REFERENCE.md, "Student training").
AIT_CHANGES: dict[str, Any] = {"loss": "kl", "gi": True, "weight_decay": 0.0, "student_lr": 1e-4}


def get_recipe(name: str) -> DistillRecipe:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


_KIND_WORDS = {
    "int": "a whole number",
    "float": "a finite number",
    "bool": "true or false",
    "tuple": "comma-separated whole numbers",
    "str": "text",
    "optint": "a whole number, or off",
    "optfloat": "a finite number, or off",
}


def _field_kind(field_type: Any) -> str:
    """'int', 'float', 'bool', 'tuple' or 'str' (annotations are strings in this module)."""
    kind = str(field_type)
    if "tuple" in kind:
        return "tuple"
    if kind == "int | None":
        return "optint"
    if kind == "float | None":
        return "optfloat"
    return next((k for k in ("int", "float", "bool") if kind in (k, f"<class '{k}'>")), "str")


def _from_text(kind: str, text: str) -> Any:
    if kind == "optint":
        return None if text.lower() in ("off", "none", "0") else int(text)
    if kind == "optfloat":
        return None if text.lower() in ("off", "none") else float(text)
    if kind == "tuple":
        return tuple(int(v) for v in text.split(",") if v.strip())
    if kind == "bool":
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(text)
        return text.lower() in ("1", "true", "yes")
    return {"int": int, "float": float, "str": str}[kind](text)


def _from_value(kind: str, value: Any) -> Any:
    """A Python value (API overrides) of the field's type; bools are not numbers here."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "optint" and (value is None or is_int):
        return value or None
    if kind == "optfloat" and (value is None or is_int or isinstance(value, float)):
        return None if value is None else float(value)
    if kind == "int" and is_int:
        return value
    if kind == "float" and (is_int or isinstance(value, float)):
        return float(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "tuple" and isinstance(value, (tuple, list)):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    raise TypeError(value)


def _convert(field_type: Any, value: Any, name: str) -> Any:
    """``value`` (CLI text or an API value) as recipe field ``name`` holds it, or a ConfigError
    that says what the field takes; the same message for ``--set`` and ``overrides=``."""
    kind = _field_kind(field_type)
    try:
        converted = _from_text(kind, value) if isinstance(value, str) else _from_value(kind, value)
        if kind in ("float", "optfloat") and converted is not None and not math.isfinite(converted):
            raise ValueError(value)
        return converted
    except (TypeError, ValueError):
        example = getattr(RECIPES["paper-cifar"], name)
        shown = ",".join(map(str, example)) if kind == "tuple" else str(example).lower()
        raise ConfigError(
            f"recipe field {name!r} takes {_KIND_WORDS[kind]}, got {value!r}; e.g. {name}={shown}"
        ) from None


def _known_fields() -> dict[str, Any]:
    return {f.name: f.type for f in fields(DistillRecipe)}


def _check_field(name: str, known: dict[str, Any]) -> None:
    if name not in known:
        raise ConfigError(f"unknown recipe field {name!r}; fields: {', '.join(sorted(known))}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["epochs=10", "rho=1e-3"]`` -> typed ``{"epochs": 10, "rho": 0.001}``."""
    known = _known_fields()
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"bad recipe override {item!r}; write FIELD=VALUE, e.g. epochs=10")
        _check_field(key, known)
        value = _convert(known[key], text, key)
        if key in values and values[key] != value:  # not silently the last one
            raise ConfigError(
                f"recipe override {key}={values[key]!r} and {key}={value!r} contradict each "
                "other; give one"
            )
        values[key] = value
    return values


def apply_overrides(recipe: DistillRecipe, values: dict[str, Any] | list[str]) -> DistillRecipe:
    """Apply a dict of fields (API) or ``FIELD=VALUE`` strings (CLI) to a recipe.

    Dict values are checked against the field types like the CLI's text (a string is read as
    the CLI would read it), so a wrong type is a one-line error, not a failure mid-run.
    """
    if not isinstance(values, dict):
        values = parse_overrides(values)
    known = _known_fields()
    typed = {}
    for key, value in values.items():
        _check_field(key, known)
        typed[key] = _convert(known[key], value, key)
    return replace(recipe, **typed)


__all__ = [
    "AIT_CHANGES",
    "DistillRecipe",
    "RECIPES",
    "apply_overrides",
    "get_recipe",
    "parse_overrides",
]
