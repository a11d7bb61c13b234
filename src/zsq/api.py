"""The Python entry point for generator-based zero-shot quantization (GDFQ, AIT, ...).

import zsq
student, history = zsq.zero_shot_quantize(teacher, method="gdfq", ait=True, wbits=4, abits=4,
                                          image_shape=(3, 32, 32), num_classes=10,
                                          recipe="short")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsq.distill import Distiller
from zsq.distill.trainer import Evaluator
from zsq.errors import ZsqError
from zsq.execution import Execution
from zsq.quant import QuantSpec, quantize_model
from zsq.recipes import AIT_CHANGES, DistillRecipe, apply_overrides, get_recipe
from zsq.runtime import resolve_device
from zsq.synth import available_sources, build_source

GENERATOR_METHODS = ("gdfq", "qimera", "arc")


def resolve_recipe(
    recipe: str | DistillRecipe = "paper-cifar",
    *,
    ait: bool = False,
    overrides: dict[str, Any] | list[str] | None = None,
) -> DistillRecipe:
    """Preset, then AIT's changes (when ``ait``), then explicit overrides, in that order."""
    base = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if ait:
        base = apply_overrides(base, AIT_CHANGES)
    return apply_overrides(base, overrides or {})


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
    recipe: str | DistillRecipe = "paper-cifar",
    overrides: dict[str, Any] | list[str] | None = None,
    device: str | torch.device = "auto",
    work_dir: Path | None = None,
    resume: bool = False,
    evaluate: Evaluator | None = None,
    progress: bool = True,
    execution: Execution | None = None,
    source_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Distill a fake-quantized student from ``teacher`` on synthetic samples of ``method``.

    ``ait=True`` applies AIT (KL-only loss, gradient inundation, no weight decay). ``work_dir``
    receives per-epoch checkpoints and ``metrics.jsonl``; ``resume=True`` continues from them.
    ``evaluate(student) -> top1`` is called on schedule for the log only. ``execution`` picks
    precision and ``torch.compile`` (:class:`zsq.execution.Execution`; default fp32, eager).
    ``source_options`` go to the sample source (e.g. Qimera's ``mix_prob``, ``num_mix``,
    ``init_from_teacher``, ``disentangle``); the recipe's generator lr and BNS weight are added.
    """
    if method not in available_sources():
        raise ZsqError(f"unknown method {method!r}; choose one of {available_sources()}")
    dev = resolve_device(device) if isinstance(device, str) else device
    full = resolve_recipe(recipe, ait=ait, overrides=overrides)
    spec = spec or QuantSpec(wbits=wbits, abits=abits)
    teacher = teacher.to(dev).eval()
    student = quantize_model(teacher, spec).to(dev)  # before the source freezes the teacher
    source_options = dict(source_options or {})
    if method in GENERATOR_METHODS:
        source_options = {"lr": full.gen_lr, "bns_weight": full.bns_weight, **source_options}
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
