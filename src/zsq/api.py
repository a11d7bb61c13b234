"""The Python entry point for zero-shot quantization (min/max, GDFQ, Qimera, ARC, with AIT).

import zsq
student, history = zsq.zero_shot_quantize(teacher, method="gdfq", ait=True, wbits=4, abits=4,
                                          image_shape=(3, 32, 32), num_classes=10,
                                          recipe="short")

Method names, option checks and their messages are those of the CLI (:mod:`zsq.methods`):
every argument is checked before any work starts.
"""

from __future__ import annotations

import fnmatch
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsq.distill import Distiller
from zsq.distill.trainer import Evaluator
from zsq.errors import ZsqError
from zsq.execution import Execution
from zsq.methods import (
    DEFAULT_RECIPE,
    GENERATOR_METHODS,
    METHOD_NAMES,
    POST_TRAINING_METHODS,
    check_method,
    refuse_unused,
)
from zsq.models import input_channels
from zsq.ptq import gaussian_batches, minmax_quantize
from zsq.quant import QuantSpec, quantize_model
from zsq.recipes import AIT_CHANGES, DistillRecipe, apply_overrides, get_recipe
from zsq.runtime import resolve_device, seed_everything
from zsq.synth import build_source
from zsq.synth.base import check_image_shape, check_num_classes

log = logging.getLogger(__name__)

__all__ = [
    "GENERATOR_METHODS",
    "METHOD_NAMES",
    "check_input_channels",
    "check_layer_patterns",
    "resolve_recipe",
    "zero_shot_quantize",
]

CALIB_SIZE = 512  # Gaussian calibration images of method minmax (the CLI's --calib-size default)
CALIB_BATCH = 128
_LAYER_TYPES = (nn.Conv2d, nn.Linear)
_ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6)


def resolve_recipe(
    recipe: str | DistillRecipe | None = None,
    *,
    ait: bool = False,
    overrides: dict[str, Any] | list[str] | None = None,
) -> DistillRecipe:
    """Preset (``paper-cifar`` when None), then AIT's changes (when ``ait``), then overrides."""
    base = get_recipe(recipe or DEFAULT_RECIPE) if not isinstance(recipe, DistillRecipe) else recipe
    if ait:
        base = apply_overrides(base, AIT_CHANGES)
    return apply_overrides(base, overrides or {})


def run_size(recipe: DistillRecipe) -> str:
    """'400 epochs x 200 iterations x batch 200 = 80,000 iterations', for the log."""
    total = recipe.epochs * recipe.iters_per_epoch
    return (
        f"{recipe.epochs} epochs x {recipe.iters_per_epoch} iterations x batch "
        f"{recipe.batch_size} = {total:,} iterations"
    )


def check_layer_patterns(model: nn.Module, spec: QuantSpec) -> None:
    """Every per-layer override pattern must match a layer it can change (else it does nothing).

    Weight bits apply to Conv2d/Linear layers; with the reference placement activation bits
    apply to ReLU/ReLU6 modules too.
    """
    types = _LAYER_TYPES + (_ACTIVATION_TYPES if spec.act_placement == "reference" else ())
    names = [name for name, module in model.named_modules() if isinstance(module, types)]
    for pattern in spec.overrides:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:3]) + (f", ..., {names[-1]}" if len(names) > 3 else "")
            raise ZsqError(
                f"layer pattern {pattern!r} (--layer) matches no layer of "
                f"{type(model).__name__}; patterns are globs over module names such as {shown}"
            )


def check_input_channels(model: nn.Module, channels: int) -> None:
    """Images of ``channels`` channels must suit the model's first convolution."""
    expected = input_channels(model)
    if expected is not None and expected != channels:
        raise ZsqError(
            f"image_shape has {channels} channel(s) but the model's first layer takes "
            f"{expected}; give image_shape=({expected}, H, W) (the CLI's --in-channels)"
        )


def zero_shot_quantize(
    teacher: nn.Module,
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    method: str = "gdfq",
    ait: bool = False,
    wbits: int | None = 4,
    abits: int | None = 4,
    spec: QuantSpec | None = None,
    recipe: str | DistillRecipe | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    device: str | torch.device = "auto",
    work_dir: str | Path | None = None,
    resume: bool = False,
    evaluate: Evaluator | None = None,
    progress: bool = True,
    execution: Execution | None = None,
    source_options: dict[str, Any] | None = None,
    seed: int | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A fake-quantized student of ``teacher`` made without data by ``method``.

    ``method``: ``minmax`` (activation ranges from Gaussian noise, no training; the history is
    empty) or a generator method, ``gdfq``, ``qimera`` or ``arc``, which distils the student on
    its synthetic samples. For those: ``recipe`` (default ``paper-cifar``, the papers' 80,000
    iterations; ``short`` runs in minutes on a CPU), ``ait=True`` applies AIT (KL-only loss,
    gradient inundation, no weight decay), ``overrides`` sets recipe fields, ``work_dir``
    receives per-epoch checkpoints and ``metrics.jsonl`` and ``resume=True`` continues from them,
    ``evaluate(student) -> top1`` is called on schedule for the log only, ``execution`` picks
    precision and ``torch.compile`` (:class:`zsq.execution.Execution`; default fp32, eager) and
    ``source_options`` go to the sample source (e.g. Qimera's ``mix_prob``, ``num_mix``,
    ``init_from_teacher``, ``disentangle``). ``spec`` replaces ``wbits``/``abits``. ``seed``
    seeds every RNG first (the CLI's ``--seed``); None leaves them as they are.
    """
    check_method(method)
    _check_teacher(teacher)
    image_shape = check_image_shape(image_shape)
    check_num_classes(num_classes)
    spec = _quant_spec(spec, wbits, abits)
    check_layer_patterns(teacher, spec)
    check_input_channels(teacher, image_shape[0])
    if method in POST_TRAINING_METHODS:
        refuse_unused(
            method,
            {
                "recipe": recipe is not None,
                "ait": ait,
                "overrides": bool(overrides),
                "source_options": bool(source_options),
                "execution": execution not in (None, Execution()),
                "work_dir": work_dir is not None,
                "resume": resume,
                "evaluate": evaluate is not None,
            },
        )
        dev = resolve_device(device) if isinstance(device, str) else device
        return _minmax(teacher, spec, image_shape, dev, seed), []
    full = resolve_recipe(recipe, ait=ait, overrides=overrides)
    work_dir = _checked_work_dir(work_dir, resume)
    execution = execution or Execution()
    dev = resolve_device(device) if isinstance(device, str) else device
    note = execution.inert_note(dev)
    if note:
        log.info(note)
    if seed is not None:
        seed_everything(seed)
    if recipe is None:
        log.warning(
            "no recipe given: using %s, the papers' full schedule (%s; days on a CPU, an "
            "estimate follows the first iterations); name one (--recipe short: minutes) for less",
            DEFAULT_RECIPE,
            run_size(full),
        )
    log.info("%s with recipe %s: %s", method, full.name, run_size(full))
    teacher = teacher.to(dev).eval()
    student = quantize_model(teacher, spec).to(dev)  # before the source freezes the teacher
    source_options = {"lr": full.gen_lr, "bns_weight": full.bns_weight, **(source_options or {})}
    source = build_source(
        method, teacher, num_classes=num_classes, image_shape=image_shape, **source_options
    ).to(dev)
    trainer = None
    try:
        trainer = Distiller(
            teacher,
            student,
            source,
            full,
            device=dev,
            work_dir=work_dir,
            evaluate=evaluate,
            progress=progress,
            execution=execution,
        )
        if resume and not trainer.resume():
            raise ZsqError(f"no checkpoint to resume in {work_dir}; start without --resume")
        history = trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        source.close()
    return student, history


def _check_teacher(teacher: Any) -> None:
    if not isinstance(teacher, nn.Module):
        raise ZsqError(
            f"teacher must be a torch.nn.Module, got {type(teacher).__name__} {teacher!r:.60}; "
            "load one first, e.g. zsq.models.load_teacher('resnet20', 'weights.pt')"
        )


def _quant_spec(spec: QuantSpec | None, wbits: int | None, abits: int | None) -> QuantSpec:
    if spec is None:
        return QuantSpec(wbits=wbits, abits=abits)
    if (wbits, abits) != (4, 4):
        raise ZsqError(
            "give the bits either as wbits/abits or inside spec, not both (spec wins silently "
            "otherwise); set them in QuantSpec(wbits=..., abits=...)"
        )
    return spec


def _minmax(
    teacher: nn.Module,
    spec: QuantSpec,
    image_shape: tuple[int, int, int],
    device: torch.device,
    seed: int | None,
) -> nn.Module:
    """The data-free baseline: min/max activation ranges observed on Gaussian noise."""
    noise = gaussian_batches(CALIB_SIZE, image_shape, CALIB_BATCH, seed=seed or 0)
    return minmax_quantize(teacher.to(device).eval(), spec, noise, device=device)


def _checked_work_dir(work_dir: str | Path | None, resume: bool) -> Path | None:
    """A folder for checkpoints that can exist or be created, checked before any training."""
    if work_dir is None:
        if resume:
            raise ZsqError("resume=True needs the work_dir that holds the run's checkpoint")
        return None
    path = Path(work_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ZsqError(f"work_dir {path} is a file; give a folder for checkpoints and metrics")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ZsqError(f"work_dir {path} cannot be created: {existing} is a file; give a folder")
    try:  # a real probe: permission bits say nothing for root or special filesystems
        Path(tempfile.mkdtemp(dir=existing, prefix=".zsq-probe-")).rmdir()
    except OSError:
        raise ZsqError(f"cannot write to {existing}; give a work_dir you can write to") from None
    return path
