"""The Python entry point for zero-shot quantization (min/max, ZeroQ, LAPQ, GDFQ, Qimera, ARC,
with AIT).

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from zsq.distill import Distiller
from zsq.distill.trainer import Evaluator
from zsq.errors import ZsqError
from zsq.execution import Execution
from zsq.methods import (
    DEFAULT_RECIPE,
    GENERATOR_METHODS,
    METHOD_NAMES,
    METHOD_RECIPE,
    POST_TRAINING_METHODS,
    VIT_METHODS,
    check_init,
    check_method,
    default_calib,
    refuse_unused,
)
from zsq.models import input_channels
from zsq.ptq import (
    CalibrationSet,
    LapqConfig,
    gaussian_batches,
    is_synthetic,
    lapq_quantize,
    minmax_quantize,
    real_calibration,
    synthetic_calibration,
)
from zsq.quant import QuantSpec, act_quantizers, inspect_forward, quant_layers, quantize_model
from zsq.recipes import AIT_CHANGES, DistillRecipe, apply_overrides, get_recipe
from zsq.runtime import resolve_device, seed_everything
from zsq.synth import build_source, check_source_options
from zsq.synth.base import check_image_shape, check_num_classes

log = logging.getLogger(__name__)

__all__ = [
    "GENERATOR_METHODS",
    "METHOD_NAMES",
    "check_input_channels",
    "check_layer_patterns",
    "make_calibration",
    "post_training_quantize",
    "resolve_recipe",
    "zero_shot_quantize",
]

Calibration = str | Dataset | CalibrationSet | None
INIT_REPORT = "init_lapq.json"  # the LAPQ start of a generator run, in its work_dir

CALIB_SIZE = 512  # Gaussian calibration images of method minmax (the CLI's --calib-size default)
CALIB_BATCH = 128
_LAYER_TYPES = (nn.Conv2d, nn.Linear)
_ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6)


def resolve_recipe(
    recipe: str | DistillRecipe | None = None,
    *,
    ait: bool = False,
    overrides: dict[str, Any] | list[str] | None = None,
    method: str | None = None,
) -> DistillRecipe:
    """Preset (``paper-cifar`` when None), then AIT's changes (when ``ait``), then what the
    method sets (:data:`zsq.methods.METHOD_RECIPE`), then overrides."""
    base = get_recipe(recipe or DEFAULT_RECIPE) if not isinstance(recipe, DistillRecipe) else recipe
    if ait:
        base = apply_overrides(base, AIT_CHANGES)
    base = apply_overrides(base, METHOD_RECIPE.get(method or "", {}))
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
    calib: Calibration = None,
    calib_size: int = CALIB_SIZE,
    lapq: LapqConfig | dict[str, Any] | None = None,
    init: str | None = None,
    calib_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A fake-quantized student of ``teacher`` made without data by ``method``.

    ``method``: a post-training method, ``minmax`` (per-channel min/max weights, running
    min/max activation ranges on the calibration images), ``zeroq`` (the same on ZeroQ's
    distilled images) or ``lapq`` (loss-aware clipping, ``lapq``: a :class:`LapqConfig` or its
    fields as a dict), whose history is one entry, the method's report; or a generator method,
    ``gdfq``, ``qimera`` or ``arc``, which distils the student on its synthetic samples. For
    those: ``recipe`` (default ``paper-cifar``, the papers' 80,000 iterations; ``short`` runs in
    minutes on a CPU), ``ait=True`` applies AIT (KL-only loss, gradient inundation, no weight
    decay), ``overrides`` sets recipe fields, ``work_dir`` receives per-epoch checkpoints and
    ``metrics.jsonl`` and ``resume=True`` continues from them, ``evaluate(student) -> top1`` is
    called on schedule for the log only, ``execution`` picks precision and ``torch.compile``
    (:class:`zsq.execution.Execution`; default fp32, eager) and ``source_options`` go to the
    sample source (e.g. Qimera's ``mix_prob``); ``init="lapq"`` starts the student from LAPQ's
    result instead of the float copy. ``calib`` (post-training methods and ``init``): a sample
    source name (``gaussian``, ``zeroq``, ``gdfq``, ...; data-free) or a labelled Dataset (real
    images: not zero-shot), ``calib_size`` images of it; unset, the method's data-free default
    (``gaussian`` for minmax, ``zeroq`` otherwise); ``calib_options`` configure a synthetic
    calibration source (for a post-training method ``source_options`` do the same). ``spec``
    replaces ``wbits``/``abits``.
    ``seed`` seeds every RNG first (the CLI's ``--seed``); None leaves them as they are.
    """
    check_method(method)
    check_init(init)
    _check_teacher(teacher)
    _check_argument_types(
        seed=(seed, int, True),
        calib_size=(calib_size, int, False),
        overrides=(overrides, (dict, list), True),
        lapq=(lapq, (LapqConfig, dict), True),
        source_options=(source_options, dict, True),
        calib_options=(calib_options, dict, True),
    )
    if evaluate is not None and not callable(evaluate):
        raise ZsqError(f"evaluate must be a function student -> top-1, got {evaluate!r:.60}")
    image_shape = check_image_shape(image_shape)
    check_num_classes(num_classes)
    spec = _quant_spec(spec, wbits, abits)
    check_layer_patterns(teacher, spec)
    check_input_channels(teacher, image_shape[0])
    calib_name = calib if isinstance(calib, str) else None
    calib_name = calib_name or (default_calib(method, init) if calib is None else None)
    if method in POST_TRAINING_METHODS:
        _check_class_count(teacher, image_shape, num_classes)
        source_options = {**(calib_options or {}), **(source_options or {})}
        _check_post_training(method, calib, calib_name, source_options, work_dir, lapq)
        refuse_unused(
            method,
            {
                "recipe": recipe is not None,
                "ait": ait,
                "overrides": bool(overrides),
                "execution": execution not in (None, Execution()),
                "resume": resume,
                "evaluate": evaluate is not None,
                "init": init is not None,
            },
        )
        dev = resolve_device(device)
        if seed is not None:
            seed_everything(seed)
        teacher = teacher.to(dev).eval()
        data = make_calibration(
            calib if calib is not None else calib_name,
            teacher,
            size=calib_size,
            num_classes=num_classes,
            image_shape=image_shape,
            seed=seed or 0,
            source_options=source_options,
            work_dir=_checked_work_dir(work_dir, False),
            progress=progress,
        )
        config = lapq if isinstance(lapq, LapqConfig) else LapqConfig.from_options(lapq)
        student, report = post_training_quantize(
            teacher, method, spec, data, lapq=config, device=dev, progress=progress
        )
        return student, [report]
    if init is None:
        refuse_unused(
            method,
            {
                "calib": calib is not None,
                "lapq": lapq is not None,
                "calib_options": bool(calib_options),
            },
        )
    full = resolve_recipe(recipe, ait=ait, overrides=overrides, method=method)
    check_source_options(method, source_options or {})  # before LAPQ (--init) or the source
    work_dir = _checked_work_dir(work_dir, resume)
    execution = execution or Execution()
    dev = resolve_device(device)
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
    if init == "lapq" and not (resume and _has_checkpoint(work_dir)):
        _start_from_lapq(
            student,
            teacher,
            spec,
            calib if calib is not None else calib_name,
            calib_size=calib_size,
            num_classes=num_classes,
            image_shape=image_shape,
            config=lapq if isinstance(lapq, LapqConfig) else LapqConfig.from_options(lapq),
            device=dev,
            work_dir=work_dir,
            progress=progress,
            seed=seed or 0,
            calib_options=calib_options,
        )
    source_options = _source_defaults(method, full, work_dir, progress) | (source_options or {})
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
        _keep_source(source, work_dir)
    finally:
        if trainer is not None:
            trainer.close()
        source.close()
    return student, history


SOURCE_FILE = "generator.safetensors"  # the trained sample source, kept for analysis
POOL_FILE = "synthetic.safetensors"  # a ViT method's synthesised images, kept for a resume


def _source_defaults(
    method: str, recipe: DistillRecipe, work_dir: Path | None, progress: bool
) -> dict[str, Any]:
    """A BN generator's lr and BNS weight come from the recipe; a ViT method's image pool is
    kept in the run folder so a resumed run does not synthesise it again, and its synthesis
    shows progress as the run does."""
    if method in VIT_METHODS:
        cache = {"cache": Path(work_dir) / POOL_FILE} if work_dir is not None else {}
        return {"progress": progress, **cache}
    return {"lr": recipe.gen_lr, "bns_weight": recipe.bns_weight}


def _keep_source(source: nn.Module, work_dir: Path | None) -> None:
    """The trained generator's weights in the run folder: the analyses draw their synthetic
    batches from the run's own generator (``zsq analyze``)."""
    from zsq.distributed import world
    from zsq.io import save_safetensors

    state = source.state_dict()
    if work_dir is not None and state and world().is_main:
        save_safetensors(state, Path(work_dir) / SOURCE_FILE, {"source": type(source).__name__})


def _check_argument_types(**arguments: tuple[Any, type | tuple[type, ...], bool]) -> None:
    """Each ``name=(value, expected types, None allowed)``: a one-line error for the first value
    of another type (bools are not ints here)."""
    for name, (value, types, optional) in arguments.items():
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join(
                t.__name__ for t in (types if isinstance(types, tuple) else (types,))
            )
            raise ZsqError(f"{name} must be {expected}, got {value!r:.60}")


def _check_class_count(teacher: nn.Module, image_shape: Sequence[int], num_classes: int) -> None:
    """The teacher's logits have ``num_classes`` columns (a generator's source checks its own)."""
    logits = inspect_forward(teacher, image_shape)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] != num_classes:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ZsqError(
            f"the teacher's output on one image is {shape}, not (1, num_classes={num_classes}); "
            "pass the teacher's number of classes"
        )


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


def _check_post_training(
    method: str,
    calib: Calibration,
    calib_name: str | None,
    source_options: dict[str, Any] | None,
    work_dir: str | Path | None,
    lapq: LapqConfig | dict[str, Any] | None,
) -> None:
    """Options a post-training method would ignore are errors, as in the CLI."""
    if method == "zeroq" and calib is not None and calib_name != "zeroq":
        raise ZsqError(
            "method zeroq calibrates on its own distilled images; drop calib, or use method "
            "minmax or lapq with that calibration data"
        )
    if lapq is not None and method != "lapq":
        raise ZsqError(f"lapq options have no effect with method {method}; drop them")
    made = calib_name is not None and calib_name != "gaussian" and is_synthetic(calib_name)
    if source_options and not made:
        raise ZsqError(
            f"source_options has no effect with method {method} calibrated on "
            f"{calib_name or 'given data'} (they configure a synthetic calibration source such "
            "as zeroq or gdfq); drop it"
        )
    if work_dir is not None and not made:
        raise ZsqError(
            f"work_dir has no effect with method {method} calibrated on "
            f"{calib_name or 'given data'} (it keeps synthetic calibration images); drop it"
        )


def make_calibration(
    calib: Calibration,
    teacher: nn.Module,
    *,
    size: int,
    num_classes: int,
    image_shape: tuple[int, int, int],
    seed: int = 0,
    source_options: dict[str, Any] | None = None,
    work_dir: Path | None = None,
    progress: bool = True,
    spec_text: str = "a given dataset",
) -> CalibrationSet:
    """Calibration images from a source name, a labelled Dataset (real) or a ready set."""
    if isinstance(calib, CalibrationSet):
        return calib
    if size < 1:
        raise ZsqError(f"the calibration size must be positive, got {size}")
    if isinstance(calib, Dataset):
        return real_calibration(calib, size, seed, spec_text)
    if not isinstance(calib, str) or not is_synthetic(calib):
        raise ZsqError(
            f"calibration {calib!r} is neither a sample source ({', '.join(_sources())}) nor a "
            "labelled Dataset; give one of those (the CLI takes a dataset spec)"
        )
    name = calib.strip().lower()
    if name == "gaussian":  # seeded on its own generator: the baseline's numbers stay fixed
        images = torch.cat(list(gaussian_batches(size, image_shape, CALIB_BATCH, seed=seed)))
        text = f"gaussian noise, {size} samples (data-free)"
        return CalibrationSet(images, None, text, real=False)
    return synthetic_calibration(
        name,
        teacher,
        size=size,
        num_classes=num_classes,
        image_shape=image_shape,
        source_options=source_options,
        work_dir=work_dir,
        progress=progress,
    )


def _sources() -> list[str]:
    from zsq.synth import available_sources

    return available_sources()


def post_training_quantize(
    teacher: nn.Module,
    method: str,
    spec: QuantSpec,
    calib: CalibrationSet,
    *,
    lapq: LapqConfig | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """A post-training student and its report. ``minmax`` and ``zeroq`` take per-channel
    min/max weight ranges and the running min/max of each activation on ``calib``; ``lapq``
    finds loss-aware clipping values (:mod:`zsq.ptq.lapq`)."""
    report: dict[str, Any] = {
        "calibration": calib.description,
        "real_data": calib.real,
        "calibration_images": len(calib.images),
    }
    if calib.report:
        report["calibration_report"] = calib.report
    if method == "lapq":
        student, report["lapq"] = lapq_quantize(
            teacher, spec, calib, lapq, device=device, progress=progress
        )
        return student, report
    batches = calib.batches(CALIB_BATCH, device)
    return minmax_quantize(teacher, spec, batches, device=device), report


def _start_from_lapq(
    student: nn.Module,
    teacher: nn.Module,
    spec: QuantSpec,
    calib: Calibration,
    *,
    calib_size: int,
    num_classes: int,
    image_shape: tuple[int, int, int],
    config: LapqConfig,
    device: torch.device,
    work_dir: Path | None,
    progress: bool,
    seed: int,
    calib_options: dict[str, Any] | None = None,
) -> None:
    """``student`` takes LAPQ's bias-corrected quantized weights as its float weights and
    LAPQ's clipping ranges as the starting activation ranges (see docs/results.md)."""
    import json

    from zsq.io import write_json

    data = make_calibration(
        calib,
        teacher,
        size=calib_size,
        num_classes=num_classes,
        image_shape=image_shape,
        seed=seed,
        source_options=calib_options,
        work_dir=work_dir,
        progress=progress,
    )
    start, report = lapq_quantize(teacher, spec, data, config, device=device, progress=progress)
    carry_over_lapq(start, student)
    log.info("student initialised from LAPQ (calibration loss %.4f)", report["loss_final"])
    if work_dir is not None:
        record = {"calibration": data.description, "real_data": data.real, "lapq": report}
        write_json(Path(work_dir) / INIT_REPORT, json.loads(json.dumps(record)))


@torch.no_grad()
def carry_over_lapq(lapq_student: nn.Module, student: nn.Module) -> None:
    """Copy what LAPQ found into a student of the same teacher: each layer's deployed weights
    (clipped, quantized, bias-corrected) become its float weights, and each activation range
    LAPQ clipped becomes the starting range of the EMA observer. The student's own quantizer
    recomputes its weight ranges from these weights (per channel, asymmetric: the paper's)."""
    layers = dict(quant_layers(student))
    for name, layer in quant_layers(lapq_student):
        layers[name].weight.copy_(layer.fake_quant_weight())
    acts = dict(act_quantizers(student))
    for name, aq in act_quantizers(lapq_student):
        target = acts.get(name)
        if target is None or target.bits is None or aq.bits is None or aq.observing:
            continue
        target.num_observed.fill_(0)  # LAPQ's range counts as the one observation
        target.set_range(aq.x_min, aq.x_max, observing=True)


def _has_checkpoint(work_dir: str | Path | None) -> bool:
    from zsq.io import checkpoint_file

    return work_dir is not None and checkpoint_file(Path(work_dir)).exists()


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
