"""Named training presets as data. Every field can be overridden (``--set field=value``).

``paper-cifar`` and ``paper-imagenet`` follow the GDFQ/AIT papers and reference code
(../shared/REFERENCE.md); ``short`` (a ResNet-20 run in 4-6 minutes on 2 idle CPU cores) and
``demo`` (the digits demo, seconds) are the same schedule shrunk for a CPU, with the lr/rho
milestones kept near 1/3, 1/2, 3/4 of training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace
from typing import Any

from zsq.errors import ZsqError

OPTIMIZERS = ("sgd", "adam", "rmsprop")
LOSS_MODES = ("ce+kl", "kl", "ce")  # student loss: the rows of the paper's Table 2


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
    weight_decay: float = 1e-4
    loss: str = "ce+kl"
    temperature: float = 20.0
    kl_reduction: str = "mean"
    # gradient inundation
    gi: bool = False
    rho: float = 1e-3
    gi_warmup_epochs: int = 4  # kappa <= 128 for these epochs after the generator warm-up
    max_kappa: float = 2.0**16
    # generator
    gen_lr: float = 1e-3
    bns_weight: float = 0.1
    # measurement
    eval_every: int = 1  # epochs between evaluations on --eval-data (the last epoch always)
    probe_batch_size: int = 256  # fixed synthetic batch for KL-to-teacher tracking

    def __post_init__(self) -> None:
        positive = ("epochs", "iters_per_epoch", "batch_size", "eval_every", "probe_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ZsqError(f"recipe field {name}={getattr(self, name)} must be >= 1")
        if self.act_calib_epochs < 1:
            raise ZsqError("act_calib_epochs must be >= 1: activation ranges need observing")
        if self.gen_warmup_epochs >= self.epochs:
            raise ZsqError(
                f"gen_warmup_epochs={self.gen_warmup_epochs} leaves no student epochs out of "
                f"epochs={self.epochs}; lower it or raise epochs"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ZsqError(f"unknown optimizer {self.optimizer!r}; use one of {OPTIMIZERS}")
        if self.loss not in LOSS_MODES:
            raise ZsqError(f"unknown student loss {self.loss!r}; use one of {LOSS_MODES}")
        if self.kl_reduction not in ("mean", "batchmean"):
            raise ZsqError("kl_reduction must be 'mean' (reference) or 'batchmean'")
        if not 0 < self.rho < 1:
            raise ZsqError(f"rho={self.rho} must be in (0, 1)")
        if self.student_lr <= 0 or self.lr_mult <= 0 or self.gen_lr <= 0:
            raise ZsqError("learning rates and lr_mult must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        gi_warmup_epochs=2,
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
        gi_warmup_epochs=1,
        lr_milestones=(5, 8, 10),
        eval_every=12,
        probe_batch_size=128,
    ),
}

# AIT's changes on top of any base method (REFERENCE.md, "Student training").
AIT_CHANGES: dict[str, Any] = {"loss": "kl", "gi": True, "weight_decay": 0.0, "student_lr": 1e-4}


def get_recipe(name: str) -> DistillRecipe:
    if name not in RECIPES:
        raise ZsqError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


def _convert(field_type: Any, text: str, name: str) -> Any:
    kind = str(field_type)
    try:
        if "tuple" in kind:
            return tuple(int(v) for v in text.split(",") if v.strip())
        if kind in ("int", "<class 'int'>"):
            return int(text)
        if kind in ("float", "<class 'float'>"):
            return float(text)
        if kind in ("bool", "<class 'bool'>"):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        return text
    except ValueError:
        raise ZsqError(f"cannot read {text!r} as a value for recipe field {name!r}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["epochs=10", "rho=1e-3"]`` -> typed ``{"epochs": 10, "rho": 0.001}``."""
    known = {f.name: f.type for f in fields(DistillRecipe)}
    values: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ZsqError(f"bad recipe override {item!r}; write FIELD=VALUE, e.g. epochs=10")
        if key not in known:
            raise ZsqError(f"unknown recipe field {key!r}; fields: {', '.join(sorted(known))}")
        values[key] = _convert(known[key], text, key)
    return values


def apply_overrides(recipe: DistillRecipe, values: dict[str, Any] | list[str]) -> DistillRecipe:
    """Apply a dict of fields (API) or ``FIELD=VALUE`` strings (CLI) to a recipe."""
    if not isinstance(values, dict):
        values = parse_overrides(values)
    unknown = set(values) - {f.name for f in fields(DistillRecipe)}
    if unknown:
        raise ZsqError(f"unknown recipe fields {sorted(unknown)}; see zsq.recipes.DistillRecipe")
    return replace(recipe, **values)


__all__ = [
    "AIT_CHANGES",
    "DistillRecipe",
    "RECIPES",
    "apply_overrides",
    "get_recipe",
    "parse_overrides",
]
