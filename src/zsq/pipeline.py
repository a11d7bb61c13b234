"""The ``quantize`` job as a library call: teacher -> method -> student -> evaluation -> outputs.

The CLI builds a :class:`QuantizeConfig` and calls :func:`run_quantize`; a Python user does the
same in a few lines. Methods register a function in ``METHODS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import zsq
from zsq import distributed
from zsq.api import (
    CALIB_SIZE,
    INIT_REPORT,
    check_layer_patterns,
    make_calibration,
    post_training_quantize,
)
from zsq.data import eval_transform, load_dataset
from zsq.errors import ZsqError
from zsq.evaluate import EvalResult, evaluate
from zsq.execution import Execution
from zsq.export.sizes import size_report
from zsq.io import (
    atomic_output_dir,
    check_output_dir,
    checkpoint_file,
    partial_dir,
    read_marker,
    read_verified,
    save_safetensors,
    sha256_file,
    write_json,
    write_marker,
    write_text,
    write_verified,
)
from zsq.methods import (
    BN_GENERATOR_METHODS,
    GENERATOR_METHODS,
    POST_TRAINING_METHODS,
    VIT_METHODS,
    check_init,
    check_method,
    default_calib,
    refuse_unused,
)
from zsq.mixed.allocate import BITS_FILE, Allocation, MixedConfig
from zsq.models import ModelMeta, default_image_size, load_teacher
from zsq.models.checkpoint import check_image_size
from zsq.ptq import CalibrationSet, LapqConfig, is_synthetic
from zsq.quant import QuantSpec, inspect_forward, quant_params
from zsq.runtime import device_description, resolve_device, seed_everything
from zsq.synth import check_source_options

log = logging.getLogger(__name__)


@dataclass
class TeacherConfig:
    """Which pretrained model to quantize. Unset fields come from the weights' JSON sidecar."""

    model: str | None  # None: the weights' sidecar names it ("model")
    weights: str | None = None
    model_kwargs: dict[str, Any] | None = None  # e.g. a timm model's constructor arguments
    num_classes: int | None = None
    in_channels: int | None = None
    normalize_mean: tuple[float, ...] | None = None
    normalize_std: tuple[float, ...] | None = None
    image_size: int | None = None
    trust_checkpoint: bool = False


@dataclass
class QuantizeConfig:
    """One ``zsq quantize`` run.

    ``calib``: a sample source (``gaussian``, ``zeroq``, ``gdfq``, ...: data-free) or a dataset
    spec (real training images, not zero-shot); None is the method's data-free default
    (:func:`zsq.methods.default_calib`). ``method_options`` holds what only some methods take:
    ``recipe``, ``ait``, ``overrides``, ``execution`` (generator methods), ``source_options``
    (the generator, or the synthetic calibration source of a post-training method), ``init``
    and ``lapq`` (LapqConfig fields). ``download`` lets torchvision fetch the
    ``eval_data``/``calib`` datasets it knows. ``mixed`` chooses per-layer weight bits under a
    budget before the method runs (:mod:`zsq.mixed`).
    """

    teacher: TeacherConfig
    out: Path
    method: str = "minmax"
    quant: QuantSpec = field(default_factory=QuantSpec)
    eval_data: str | None = None
    eval_limit: int | None = None
    calib: str | None = None
    calib_size: int = CALIB_SIZE
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    method_options: dict[str, Any] = field(default_factory=dict)
    download: bool = False
    mixed: MixedConfig | None = None  # --budget / --bits-from: per-layer weight bits


@dataclass
class Context:
    """What a method receives: the loaded teacher and everything resolved from the config."""

    config: QuantizeConfig
    teacher: nn.Module
    meta: ModelMeta
    image_shape: tuple[int, int, int]
    device: torch.device
    work_dir: Path | None  # the run folder; None where nothing may be written (zsq eval)
    eval_set: Dataset | None
    calib_set: Dataset | None = None  # real calibration images (--calib SPEC), else None
    allocation: Allocation | None = None  # per-layer bits chosen under --budget

    @property
    def calib(self) -> str:
        """The calibration source or dataset spec this run uses."""
        return resolved_calib(self.config)


@dataclass
class MethodResult:
    student: nn.Module
    report: dict[str, Any] = field(default_factory=dict)


Method = Callable[[Context], MethodResult]
METHODS: dict[str, Method] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    def wrap(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return wrap


def resolved_calib(cfg: QuantizeConfig) -> str:
    """``--calib``, else the method's data-free default."""
    return cfg.calib or default_calib(cfg.method, cfg.method_options.get("init"))


def calibration_set(
    ctx: Context, work_dir: Path | None, mark_resumable: bool = True
) -> CalibrationSet:
    """The run's calibration images: real ones from ``--calib SPEC``, else synthetic ones from
    the named source, kept in ``work_dir`` (the run folder) so a resumed run reuses them
    (``mark_resumable``: a checkpoint marker keeps the folder if the run stops)."""
    cfg = ctx.config
    data = ctx.calib_set if ctx.calib_set is not None else ctx.calib
    made = make_calibration(
        data,
        ctx.teacher,
        size=cfg.calib_size,
        num_classes=ctx.meta.num_classes,
        image_shape=ctx.image_shape,
        seed=cfg.seed,
        source_options=calib_options(cfg),
        work_dir=work_dir,
        progress=cfg.progress,
        spec_text=ctx.calib,
    )
    if mark_resumable and work_dir is not None and not made.real and ctx.calib != "gaussian":
        _keep_for_resume(work_dir)
    return made


def calib_options(cfg: QuantizeConfig) -> dict[str, Any]:
    """Options of the synthetic calibration source: ``--calib-opt``, and for a post-training
    method (whose only source it is) ``--source-opt`` too."""
    opts = cfg.method_options
    options = dict(opts.get("calib_options") or {})
    if cfg.method in POST_TRAINING_METHODS:
        options.update(opts.get("source_options") or {})
    return options


def _keep_for_resume(work: Path) -> None:
    """A checkpoint marks the run as resumable: its calibration images are kept if it stops."""
    path = checkpoint_file(work)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_verified(path, json.dumps({"calibration": "calibration.safetensors"}).encode())


def run_post_training(ctx: Context) -> MethodResult:
    """minmax, zeroq or lapq on the run's calibration images."""
    cfg = ctx.config
    data = calibration_set(ctx, ctx.work_dir)
    config = LapqConfig.from_options(cfg.method_options.get("lapq"))
    student, report = post_training_quantize(
        ctx.teacher,
        cfg.method,
        cfg.quant,
        data,
        lapq=config if cfg.method == "lapq" else None,
        device=ctx.device,
        progress=cfg.progress,
    )
    return MethodResult(student, report)


def run_minmax(ctx: Context) -> MethodResult:
    """Weights: per-channel min/max. Activations: running min/max over the calibration set."""
    return run_post_training(ctx)


for _name in POST_TRAINING_METHODS:
    register_method(_name)(run_post_training)


def model_image_shape(model: str, meta: ModelMeta) -> tuple[int, int, int]:
    """The teacher's input: --image-size, else the sidecar's image_size, else the model's usual
    size. Never the evaluation data's: it only measures, and must fit this shape."""
    size = meta.image_size or default_image_size(model)
    return (meta.in_channels, size, size)


def _load_for_model(
    spec: str, split: str, meta: ModelMeta, image_shape: tuple[int, int, int], download: bool
) -> Dataset:
    """A real dataset in the teacher's input space, checked to fit it (channels, size, labels)."""
    return load_dataset(
        spec,
        split=split,
        normalize_mean=meta.normalize_mean,
        normalize_std=meta.normalize_std,
        download=download,
        channels=image_shape[0],
        image_size=image_shape[1],
        num_classes=meta.num_classes,
    )


def load_eval_set(
    spec: str | None,
    meta: ModelMeta,
    image_shape: tuple[int, int, int],
    limit: int | None = None,
    download: bool = False,
) -> Dataset | None:
    if spec is None:
        return None
    dataset = _load_for_model(spec, "test", meta, image_shape, download)
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    return dataset


def _check_inputs(cfg: QuantizeConfig) -> None:
    """Every check that needs no file: before anything is loaded, written or run."""
    check_method(cfg.method)
    if cfg.calib_size < 1:
        raise ZsqError(f"--calib-size must be positive, got {cfg.calib_size}")
    if cfg.eval_limit is not None and cfg.eval_limit < 1:
        raise ZsqError(
            f"the evaluation limit (--limit/--eval-limit) must be >= 1, got {cfg.eval_limit}; "
            "leave it out to evaluate every image"
        )
    if cfg.eval_limit is not None and cfg.eval_data is None:
        raise ZsqError("--eval-limit has no effect without --eval-data; drop it or add the data")
    if cfg.mixed is not None:
        cfg.mixed.check()
    if cfg.teacher.image_size is not None:
        check_image_size(cfg.teacher.image_size)
    if cfg.teacher.trust_checkpoint and cfg.teacher.weights is None:
        raise ZsqError("--trust-checkpoint has no effect without --weights; drop it")
    if cfg.download and cfg.eval_data is None and is_synthetic(resolved_calib(cfg)):
        raise ZsqError("--download has no effect without a dataset (--eval-data, --calib); drop it")
    _check_method_options(cfg)


def _check_method_options(cfg: QuantizeConfig) -> None:
    """Options the chosen method would silently ignore are errors (see zsq.methods)."""
    opts = cfg.method_options
    init = check_init(opts.get("init"))
    calib = resolved_calib(cfg)
    if cfg.method in POST_TRAINING_METHODS:
        execution = opts.get("execution")
        refuse_unused(
            cfg.method,
            {
                "recipe": opts.get("recipe") is not None,
                "ait": bool(opts.get("ait")),
                "overrides": bool(opts.get("overrides")),
                "execution": execution not in (None, Execution()),
                "--init": init is not None,
            },
        )
        if cfg.method == "zeroq" and calib != "zeroq":
            raise ZsqError(
                "--method zeroq calibrates on its own distilled images; drop --calib, or use "
                f"--method minmax or lapq with --calib {cfg.calib}"
            )
        if opts.get("source_options") and opts.get("calib_options"):
            raise ZsqError(
                f"method {cfg.method}'s only source is its calibration source: give its options "
                "once, with --calib-opt (or --source-opt)"
            )
    else:
        refuse_unused(
            cfg.method,
            {
                "--calib": cfg.calib is not None and init is None,
                "--calib-opt": bool(opts.get("calib_options")) and init is None,
            },
        )
        check_source_options(cfg.method, opts.get("source_options") or {})
    uses_calib = cfg.method in POST_TRAINING_METHODS or init is not None
    made = is_synthetic(calib) and calib != "gaussian"
    if uses_calib and not made and calib_options(cfg):
        flag = "--calib-opt" if opts.get("calib_options") else "--source-opt"
        raise ZsqError(
            f"{flag} has no effect with --calib {calib} (it configures a synthetic "
            "calibration source such as zeroq or gdfq); drop it"
        )
    if opts.get("lapq") and cfg.method != "lapq" and init != "lapq":
        raise ZsqError(
            f"--lapq-layers/--lapq-opt have no effect with method {cfg.method}; drop them, or "
            "use --method lapq or --init lapq"
        )
    if opts.get("lapq") is not None:
        LapqConfig.from_options(opts["lapq"])  # bad names or values fail before any work


def prepare(cfg: QuantizeConfig) -> tuple[nn.Module, ModelMeta, Dataset | None, torch.device]:
    """Load and validate every input before anything is written."""
    _check_inputs(cfg)
    device = resolve_device(cfg.device)
    t = cfg.teacher
    teacher, meta = load_teacher(
        t.model,
        t.weights,
        model_kwargs=t.model_kwargs,
        num_classes=t.num_classes,
        in_channels=t.in_channels,
        normalize_mean=t.normalize_mean,
        normalize_std=t.normalize_std,
        image_size=t.image_size,
        trust_checkpoint=t.trust_checkpoint,
    )
    t.model = t.model or meta.model  # named by the sidecar
    check_layer_patterns(teacher, cfg.quant)
    shape = model_image_shape(t.model, meta)
    eval_set = load_eval_set(cfg.eval_data, meta, shape, cfg.eval_limit, cfg.download)
    return teacher.to(device).eval(), meta, eval_set, device


def build_context(cfg: QuantizeConfig, work_dir: Path | None) -> Context:
    """Load and validate the teacher, the evaluation and calibration data (nothing is written)."""
    teacher, meta, eval_set, device = prepare(cfg)
    image_shape = model_image_shape(cfg.teacher.model, meta)
    log.info("input shape %s (%s)", image_shape, _shape_source(cfg.teacher, meta))
    inspect_forward(teacher, image_shape)  # a shape the model refuses: one line, before any work
    calib_set = None
    calib = resolved_calib(cfg)
    uses_calib = cfg.method in POST_TRAINING_METHODS or cfg.method_options.get("init")
    if uses_calib and not is_synthetic(calib):
        calib_set = _load_for_model(calib, "train", meta, image_shape, cfg.download)
    return Context(cfg, teacher, meta, image_shape, device, work_dir, eval_set, calib_set)


def _check_teacher_fits(ctx: Context) -> None:
    """A source that synthesises from BatchNorm statistics needs a teacher with BatchNorm; one
    that synthesises from attention needs a vision transformer."""
    from zsq.synth.vit_losses import require_attention
    from zsq.synth.zeroq import require_batchnorm

    cfg = ctx.config
    if cfg.method in BN_GENERATOR_METHODS:
        require_batchnorm(ctx.teacher, f"--method {cfg.method}")
    if cfg.method in VIT_METHODS:
        require_attention(ctx.teacher, f"--method {cfg.method}")
    uses_calib = cfg.method in POST_TRAINING_METHODS or cfg.method_options.get("init")
    if uses_calib and is_synthetic(ctx.calib) and ctx.calib != "gaussian":
        name = "--method zeroq" if cfg.method == "zeroq" else f"--calib {ctx.calib}"
        if ctx.calib in VIT_METHODS:
            require_attention(ctx.teacher, name)
        else:
            require_batchnorm(ctx.teacher, name)


def _shape_source(t: TeacherConfig, meta: ModelMeta) -> str:
    if t.image_size is not None:
        return "--image-size"
    if meta.image_size is not None:
        return "the weights' sidecar"
    return f"the usual size of {t.model}; pass --image-size if it takes another"


def run_quantize(cfg: QuantizeConfig) -> dict[str, Any]:
    """Quantize, evaluate and write ``student.safetensors``, ``quant.json``, ``report.json/.md``.

    Under ``torchrun`` (a process group set up, :mod:`zsq.distributed`) every rank calls this;
    rank 0 checks and writes the output folder, and every rank trains and evaluates its share.
    """
    started = time.perf_counter()
    current = distributed.world()
    cfg = _for_this_rank(cfg, current)
    _check_inputs(cfg)
    out, overwrite, resume = cfg.out, cfg.overwrite, cfg.resume
    distributed.on_main(lambda: check_output_dir(out, overwrite=overwrite, resume=resume))
    ctx = build_context(cfg, cfg.out)
    _check_teacher_fits(ctx)
    check_budget(ctx)
    options = run_options(ctx)
    previous = distributed.on_main(lambda: _sessions_before(cfg, options))
    seed_everything(cfg.seed)
    if not current.is_main:  # trains and evaluates its share; rank 0 writes
        ctx.work_dir = partial_dir(cfg.out)
        if cfg.mixed is not None:
            apply_allocation(ctx, distributed.broadcast_object(None))
        result = METHODS[cfg.method](ctx)
        return _build_report(ctx, result, started, previous)
    with atomic_output_dir(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume) as work:
        ctx.work_dir = work
        write_marker(work, _run_record(options, previous))
        try:
            if cfg.mixed is not None:
                allocation = run_allocation(ctx, work)
                apply_allocation(ctx, distributed.broadcast_object(allocation))
            result = METHODS[cfg.method](ctx)
            report = _build_report(ctx, result, started, previous)
        except BaseException:  # the time this session spent counts when the run is resumed
            with contextlib.suppress(OSError):
                write_marker(work, _run_record(options, [*previous, _seconds_since(started)]))
            raise
        _write_outputs(work, result.student, report)
        write_marker(work, _run_record(options, report["sessions"]))
    log.info("wrote %s", cfg.out)
    return report


def _for_this_rank(cfg: QuantizeConfig, current: distributed.World) -> QuantizeConfig:
    """The rank's device (its own GPU under NCCL) and progress bars on rank 0 only; methods
    that do not run over several processes are refused."""
    if not current.active:
        return cfg
    if cfg.method in POST_TRAINING_METHODS or cfg.method_options.get("init"):
        what = f"--method {cfg.method}" if cfg.method in POST_TRAINING_METHODS else "--init"
        raise ZsqError(
            f"{what} runs in one process (it takes minutes, not GPU-days); start it without "
            "torchrun, or use a generator method (gdfq, qimera, arc) over several processes"
        )
    return dataclasses.replace(
        cfg,
        device=distributed.device_for(cfg.device, current),
        progress=cfg.progress and current.is_main,
    )


# --- mixed precision: bits per layer under a budget, before the method ----------------------
def check_budget(ctx: Context) -> None:
    """Before anything is written: a reused allocation fits the teacher; a budget is
    achievable at the narrowest width (else one line naming the smallest achievable cost)."""
    from zsq.mixed.allocate import check_feasible, check_reuse, read_bits

    mixed = ctx.config.mixed
    if mixed is None:
        return
    if ctx.config.quant.overrides:
        raise ZsqError(
            "--layer overrides and --budget/--bits-from both set layer widths; drop --layer (the "
            "allocation chooses every layer's width)"
        )
    if (ctx.config.method_options.get("lapq") or {}).get("layers") == "paper":
        raise ZsqError(
            "--lapq-layers paper keeps three layers in full precision, which the allocation "
            "counts as quantized; use --lapq-layers all with --budget/--bits-from"
        )
    if mixed.bits_from is not None:
        check_reuse(read_bits(mixed.bits_from), ctx.teacher, ctx.image_shape, ctx.config.quant)
    else:
        check_feasible(ctx.teacher, ctx.image_shape, mixed, ctx.config.quant)


def run_allocation(ctx: Context, work: Path) -> Allocation:
    """The run's allocation: kept from an earlier session, reused (--bits-from) or made now on
    synthetic images from the configured source, and written to ``bits.json``."""
    from zsq.mixed.allocate import allocate, check_reuse, read_bits, write_bits

    cfg, mixed = ctx.config, ctx.config.mixed
    kept = work / BITS_FILE
    if kept.is_file():
        return read_bits(kept)
    if mixed.bits_from is not None:
        reused = read_bits(mixed.bits_from)
        allocation = check_reuse(reused, ctx.teacher, ctx.image_shape, cfg.quant)
    else:
        folder = work / "allocation"
        folder.mkdir(exist_ok=True)
        images = make_calibration(
            mixed.source,
            ctx.teacher,
            size=mixed.samples,
            num_classes=ctx.meta.num_classes,
            image_shape=ctx.image_shape,
            seed=cfg.seed,
            source_options=mixed.source_options,
            work_dir=folder,
            progress=cfg.progress,
        )
        allocation = allocate(
            ctx.teacher,
            image_shape=ctx.image_shape,
            budget=mixed.budget,
            allocator=mixed.allocator,
            choices=mixed.choices,
            spec=cfg.quant,
            images=images.images.to(ctx.device),
            samples=images.description,
            penalty=1.0 if mixed.penalty is None else mixed.penalty,
            search_steps=mixed.steps,
            probes=mixed.probes,
            seed=cfg.seed,
            progress=cfg.progress,
            act_choices=mixed.act_choices,
        )
    write_bits(allocation, kept)
    return allocation


def apply_allocation(ctx: Context, allocation: Allocation) -> None:
    ctx.allocation = allocation
    ctx.config = dataclasses.replace(ctx.config, quant=allocation.apply(ctx.config.quant))


MIXED = "mixed"  # the report's wbits/abits where an allocation chose the widths per layer


def mixed_bits(allocation: Allocation) -> dict[str, str]:
    """The report's top-level widths under an allocation: ``--wbits``/``--abits`` were only the
    defaults it overrode, so they would misstate the student (per layer: ``allocation``)."""
    return {"wbits": MIXED, **({"abits": MIXED} if allocation.act_sites else {})}


def allocation_report(allocation: Allocation, sizes: dict[str, Any]) -> dict[str, Any]:
    """What the report says about the bits: per layer, their parameter-weighted mean (the unit
    of a ``wbits=`` budget), the cost beside the budget, the time."""
    params = [sizes["layers"][name]["params"] for name in allocation.layers]
    return {
        "allocator": allocation.allocator,
        "budget": allocation.budget,
        "cost": allocation.cost,
        "limit": allocation.limit,
        "within_budget": allocation.cost <= allocation.limit * (1 + 1e-9),
        "mean_wbits": round(allocation.mean_wbits(params), 4),
        "wbits": dict(zip(allocation.layers, allocation.wbits, strict=True)),
        "abits": (
            dict(zip(allocation.act_sites, allocation.act_bits, strict=True))
            if allocation.act_sites
            else allocation.abits
        ),
        "seconds": allocation.seconds,
        "samples": allocation.samples,
        "file": BITS_FILE,
    }


# --- the run record: what defines a run, checked on --resume --------------------------------
def run_options(ctx: Context) -> dict[str, Any]:
    """Every option that defines the run's result, named as on the command line.

    Options that change only speed (device, precision, compile, progress) are left out. The
    teacher is identified by the sha256 of its weights file, not by its path.
    """
    cfg, meta = ctx.config, ctx.meta
    quant = cfg.quant.to_dict()
    options: dict[str, Any] = {
        "--method": cfg.method,
        "--model": cfg.teacher.model,
        "--model-kwarg": meta.model_kwargs or None,
        "--weights (sha256)": _file_digest(cfg.teacher.weights),
        "--num-classes": meta.num_classes,
        "--in-channels": meta.in_channels,
        "--normalize-mean": meta.normalize_mean,
        "--normalize-std": meta.normalize_std,
        "--image-size (input shape)": ctx.image_shape,
        "--seed": cfg.seed,
        "--calib": resolved_calib(cfg),
        "--calib-size": cfg.calib_size,
        "--init": cfg.method_options.get("init"),
        "--eval-data": cfg.eval_data,  # else metrics.jsonl would mix two evaluation sets
        "--eval-limit": cfg.eval_limit,
        "--wbits": quant.pop("wbits"),
        "--abits": quant.pop("abits"),
        "--per-tensor": not quant.pop("per_channel"),
        "--symmetric": quant.pop("w_symmetric"),
        "--act-placement": quant.pop("act_placement"),
        "--layer": quant.pop("overrides"),
        "mixed precision": cfg.mixed.to_dict() if cfg.mixed is not None else None,
        "world size": distributed.world().size if distributed.world().active else None,
        **{f"quant {key}": value for key, value in quant.items()},
    }
    if cfg.method in GENERATOR_METHODS:
        from zsq.api import resolve_recipe

        opts = cfg.method_options
        recipe = resolve_recipe(
            opts.get("recipe"),  # None: the default preset
            ait=opts.get("ait", False),
            overrides=opts.get("overrides"),
            method=cfg.method,
        )
        options["--ait"] = bool(opts.get("ait", False))
        options.update({f"--set {key}": value for key, value in recipe.to_dict().items()})
    sources = cfg.method_options.get("source_options") or {}
    options.update({f"--source-opt {key}": value for key, value in sources.items()})
    calib = cfg.method_options.get("calib_options") or {}
    options.update({f"--calib-opt {key}": value for key, value in calib.items()})
    if cfg.method == "lapq" or cfg.method_options.get("init") == "lapq":
        lapq = LapqConfig.from_options(cfg.method_options.get("lapq")).to_dict()
        options.update({f"--lapq-opt {key}": value for key, value in lapq.items()})
    return json.loads(json.dumps(options))  # as read back from the record: tuples become lists


def _file_digest(path: str | None) -> str | None:
    return sha256_file(Path(path)) if path and Path(path).is_file() else None


def _run_record(options: dict[str, Any], sessions: list[float]) -> dict[str, Any]:
    return {"zsq_version": zsq.__version__, "options": options, "sessions": sessions}


def _seconds_since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def _sessions_before(cfg: QuantizeConfig, options: dict[str, Any]) -> list[float]:
    """The seconds of earlier sessions of a resumed run, after checking it can continue exactly:
    the same run-defining options and an intact checkpoint. A new run has none."""
    if not cfg.resume:
        return []
    work = partial_dir(cfg.out)
    record = read_marker(work) or {}
    restart = f"start again with --out {cfg.out} --overwrite"
    if "options" not in record:
        raise ZsqError(f"{work} does not record the options it started with; {restart}")
    _check_same_world(record["options"], options, cfg.out)
    changed = _differences(record["options"], options)
    if changed:
        raise ZsqError(
            f"cannot resume {cfg.out}: options differ from those the run started with ({changed}); "
            "resume with the same options, or start a new run with --out"
        )
    read_verified(checkpoint_file(work), fix=restart)
    return [float(s) for s in record.get("sessions", [])]


def _check_same_world(saved: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    """A run continues with the number of processes it started with (each has its own RNG
    stream, and the batch is split that many ways)."""
    before, now = saved.get("world size") or 1, current.get("world size") or 1
    if before != now:
        raise ZsqError(
            f"cannot resume {out}: it ran as {before} process(es), this is {now}; resume with "
            f"torchrun and {before} processes in all (--nproc-per-node x nodes)"
            if before > 1
            else f"cannot resume {out}: it ran as one process, this is {now}; resume it without "
            "torchrun"
        )


def _differences(saved: dict[str, Any], current: dict[str, Any], shown: int = 6) -> str:
    """``--wbits 4 -> 3, --seed 0 -> 7`` for the options whose values differ."""
    names = [
        k
        for k in {**saved, **current}
        if saved.get(k, "(unset)") != current.get(k, "(unset)")
        and not (k not in saved and current[k] is None)  # an option newer than the run, unset
    ]
    parts = [
        f"{k} {_short(saved.get(k, '(unset)'))} -> {_short(current.get(k, '(unset)'))}"
        for k in names[:shown]
    ]
    if len(names) > shown:
        parts.append(f"and {len(names) - shown} more")
    return ", ".join(parts)


def _short(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):  # a sha256 is told apart by its start
        return value[:12] + "..." if len(value) == 64 else value
    return json.dumps(value)


def _score(model: nn.Module, eval_set: Dataset | None, device, progress: bool) -> EvalResult | None:
    if eval_set is None:
        return None
    return evaluate(model, eval_set, device=device, progress=progress, distributed=True)


def _build_report(
    ctx: Context, result: MethodResult, started: float, previous: Sequence[float] = ()
) -> dict[str, Any]:
    """The report; ``seconds`` is the run's total over its sessions (``previous`` ones from
    earlier, interrupted sessions, then this one), listed in ``sessions``."""
    cfg = ctx.config
    execution = cfg.method_options.get("execution") or Execution()
    with execution.tensor_core_scope():  # fp32 means fp32 (no cuDNN TF32) in the report too
        teacher_score = _score(ctx.teacher, ctx.eval_set, ctx.device, cfg.progress)
        student_score = _score(result.student, ctx.eval_set, ctx.device, cfg.progress)
    report: dict[str, Any] = {
        "method": cfg.method,
        "wbits": cfg.quant.wbits,
        "abits": cfg.quant.abits,
        "model": cfg.teacher.model,
        "weights": cfg.teacher.weights,
        "eval_data": cfg.eval_data,
        "teacher_top1": teacher_score.top1 if teacher_score else None,
        "teacher_top5": teacher_score.top5 if teacher_score else None,
        "student_top1": student_score.top1 if student_score else None,
        "student_top5": student_score.top5 if student_score else None,
        "n_eval": student_score.n if student_score else 0,
        "seed": cfg.seed,
        "device": device_description(ctx.device),
        **distributed.world().describe(),
        "calibration": "none",
        "real_data": False,
        "quant_spec": cfg.quant.to_dict(),
        "image_shape": list(ctx.image_shape),
        "eval_transform": eval_transform(ctx.eval_set) if ctx.eval_set is not None else None,
        "zsq_version": zsq.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }
    report.update(result.report)
    sizes = size_report(result.student)
    if ctx.allocation is not None:
        report.update(mixed_bits(ctx.allocation))
        report["allocation"] = allocation_report(ctx.allocation, sizes)
    report["sizes"] = sizes
    report["sessions"] = [*previous, _seconds_since(started)]
    report["seconds"] = round(sum(report["sessions"]), 2)
    return report


def _write_outputs(work: Path, student: nn.Module, report: dict[str, Any]) -> None:
    save_safetensors(student.state_dict(), work / "student.safetensors", {"zsq": zsq.__version__})
    write_json(work / "quant.json", quant_params(student))
    write_json(work / "report.json", report)
    write_text(work / "report.md", report_markdown(report))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _bits_text(report: dict[str, Any]) -> str:
    """``W4A4``; under an allocation, the budget, its allocator and the mean weight bits."""
    allocation = report.get("allocation")
    if allocation is None:
        return f"W{report['wbits'] or 32}A{report['abits'] or 32}"
    acts = "mixed" if report["abits"] == MIXED else report["abits"] or 32
    return (
        f"mixed (budget {allocation['budget']}, {allocation['allocator']}): "
        f"mean W{allocation['mean_wbits']:.2f} A{acts}"
    )


def report_markdown(report: dict[str, Any]) -> str:
    rows = [
        ("method", report["method"]),
        ("bits", _bits_text(report)),
        ("model", report["model"]),
        ("weights", report["weights"]),
        ("eval data", report["eval_data"]),
        ("images evaluated", report["n_eval"]),
        (
            "teacher top-1 / top-5",
            f"{_fmt(report['teacher_top1'])} / {_fmt(report['teacher_top5'])}",
        ),
        (
            "student top-1 / top-5",
            f"{_fmt(report['student_top1'])} / {_fmt(report['student_top5'])}",
        ),
        ("calibration", report["calibration"]),
        ("real data used", "YES (not zero-shot)" if report.get("real_data") else "no"),
        ("seed", report["seed"]),
        ("device", report["device"]),
        ("wall time (s)", report["seconds"]),
    ]
    lines = ["# zsq quantize report", "", "| field | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in rows]
    return "\n".join(lines) + "\n"


def run_distillation(ctx: Context) -> MethodResult:
    """A generator-based method (``--method gdfq [--ait]``) via :func:`zero_shot_quantize`."""
    from zsq.api import resolve_recipe, zero_shot_quantize

    cfg, opts = ctx.config, ctx.config.method_options
    recipe_options = {
        "recipe": opts.get("recipe"),  # None: the default, which zero_shot_quantize announces
        "ait": opts.get("ait", False),
        "overrides": opts.get("overrides"),
    }
    recipe = resolve_recipe(**recipe_options, method=cfg.method)
    evaluate_fn = None
    if ctx.eval_set is not None:

        def evaluate_fn(student: nn.Module) -> float:
            return evaluate(
                student, ctx.eval_set, device=ctx.device, progress=False, distributed=True
            ).top1

    init, calib = opts.get("init"), None
    if init is not None and not (cfg.resume and checkpoint_file(ctx.work_dir).exists()):
        calib = calibration_set(ctx, ctx.work_dir, mark_resumable=False)
    student, history = zero_shot_quantize(
        ctx.teacher,
        image_shape=ctx.image_shape,
        num_classes=ctx.meta.num_classes,
        method=cfg.method,
        spec=cfg.quant,
        **recipe_options,
        device=ctx.device,
        work_dir=ctx.work_dir,
        resume=cfg.resume,
        evaluate=evaluate_fn,
        progress=cfg.progress,
        execution=opts.get("execution"),
        source_options=opts.get("source_options"),
        init=init,
        calib=calib,
        calib_size=cfg.calib_size,
        lapq=opts.get("lapq"),
    )
    last = history[-1] if history else {}
    report = {
        "method": cfg.method + ("+ait" if opts.get("ait") else ""),
        "recipe": recipe.to_dict(),
        "calibration": (
            f"EMA of synthetic batches over the first {recipe.act_calib_epochs} epochs (data-free)"
        ),
        "execution": vars(opts.get("execution") or Execution()),
        "source_options": opts.get("source_options") or {},
        "final_probe_kl": last.get("probe_kl"),
        "epochs_run": len(history),
        "metrics": "metrics.jsonl",
        "init": None,
    }
    if init is not None:
        record = json.loads((ctx.work_dir / INIT_REPORT).read_text())
        report["init"] = {"method": init, **record}
        report["real_data"] = record["real_data"]
    return MethodResult(student, report)


for _name in GENERATOR_METHODS:
    register_method(_name)(run_distillation)
