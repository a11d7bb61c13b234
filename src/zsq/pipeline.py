"""The ``quantize`` job as a library call: teacher -> method -> student -> evaluation -> outputs.

The CLI builds a :class:`QuantizeConfig` and calls :func:`run_quantize`; a Python user does the
same in a few lines. Methods register a function in ``METHODS``.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import zsq
from zsq.api import GENERATOR_METHODS
from zsq.data import load_dataset, subset
from zsq.errors import ZsqError
from zsq.evaluate import EvalResult, evaluate
from zsq.execution import Execution
from zsq.io import atomic_output_dir, check_output_dir, save_safetensors, write_json, write_text
from zsq.models import ModelMeta, load_teacher
from zsq.ptq import calibrate_activations, gaussian_batches
from zsq.quant import QuantSpec, quant_params, quantize_model
from zsq.runtime import device_description, resolve_device, seed_everything

log = logging.getLogger(__name__)


@dataclass
class TeacherConfig:
    """Which pretrained model to quantize. Unset fields come from the weights' JSON sidecar."""

    model: str
    weights: str | None = None
    num_classes: int | None = None
    in_channels: int | None = None
    normalize_mean: tuple[float, ...] | None = None
    normalize_std: tuple[float, ...] | None = None
    image_size: int | None = None
    trust_checkpoint: bool = False


@dataclass
class QuantizeConfig:
    """One ``zsq quantize`` run.

    ``calib`` is 'gaussian' (data-free) or a dataset spec (real training images, not zero-shot).
    """

    teacher: TeacherConfig
    out: Path
    method: str = "minmax"
    quant: QuantSpec = field(default_factory=QuantSpec)
    eval_data: str | None = None
    eval_limit: int | None = None
    calib: str = "gaussian"
    calib_size: int = 512
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    method_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What a method receives: the loaded teacher and everything resolved from the config."""

    config: QuantizeConfig
    teacher: nn.Module
    meta: ModelMeta
    image_shape: tuple[int, int, int]
    device: torch.device
    work_dir: Path
    eval_set: Dataset | None


@dataclass
class MethodResult:
    student: nn.Module
    report: dict[str, Any] = field(default_factory=dict)


Method = Callable[[Context], MethodResult]
METHODS: dict[str, Method] = {}
DEFAULT_IMAGE_SIZE = {"resnet20": 32, "resnet32": 32, "resnet44": 32, "resnet56": 32}


def register_method(name: str) -> Callable[[Method], Method]:
    def wrap(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return wrap


def calibration_batches(ctx: Context, batch_size: int = 128) -> tuple[Iterator[Tensor], str]:
    """Batches for activation-range calibration and a description for the report."""
    cfg = ctx.config
    if cfg.calib == "gaussian":
        batches = gaussian_batches(cfg.calib_size, ctx.image_shape, batch_size, seed=cfg.seed)
        return batches, f"gaussian noise, {cfg.calib_size} samples (data-free)"
    real = load_dataset(
        cfg.calib,
        split="train",
        normalize_mean=ctx.meta.normalize_mean,
        normalize_std=ctx.meta.normalize_std,
    )
    chosen = subset(real, min(cfg.calib_size, len(real)), seed=cfg.seed)
    loader = DataLoader(chosen, batch_size=batch_size, shuffle=False)
    text = f"REAL DATA: {len(chosen)} training images of {cfg.calib} (not zero-shot)"
    return (x for x, _ in loader), text


@register_method("minmax")
def run_minmax(ctx: Context) -> MethodResult:
    """Weights: per-channel min/max. Activations: running min/max over the calibration set."""
    student = quantize_model(ctx.teacher, ctx.config.quant).to(ctx.device)
    batches, calibration = calibration_batches(ctx)
    calibrate_activations(student, batches, observer="minmax", device=ctx.device)
    return MethodResult(student, {"calibration": calibration})


def _infer_image_shape(cfg: TeacherConfig, meta: ModelMeta, eval_set: Dataset | None) -> tuple:
    channels = meta.in_channels or 3
    if cfg.image_size:
        return (channels, cfg.image_size, cfg.image_size)
    if eval_set is not None:
        shape = tuple(eval_set[0][0].shape)
        log.info("input shape %s taken from the evaluation data (shape only)", shape)
        return shape
    size = DEFAULT_IMAGE_SIZE.get(cfg.model, 224)
    return (channels, size, size)


def load_eval_set(spec: str | None, meta: ModelMeta, limit: int | None = None) -> Dataset | None:
    if spec is None:
        return None
    dataset = load_dataset(
        spec, split="test", normalize_mean=meta.normalize_mean, normalize_std=meta.normalize_std
    )
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    return dataset


def _check_config(cfg: QuantizeConfig) -> None:
    if cfg.method not in METHODS:
        raise ZsqError(f"unknown method {cfg.method!r}; choose one of {sorted(METHODS)}")
    if cfg.calib_size < 1:
        raise ZsqError(f"--calib-size must be positive, got {cfg.calib_size}")
    check_output_dir(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume)


def prepare(cfg: QuantizeConfig) -> tuple[nn.Module, ModelMeta, Dataset | None, torch.device]:
    """Load and validate every input before anything is written."""
    device = resolve_device(cfg.device)
    t = cfg.teacher
    teacher, meta = load_teacher(
        t.model,
        t.weights,
        num_classes=t.num_classes,
        in_channels=t.in_channels,
        normalize_mean=t.normalize_mean,
        normalize_std=t.normalize_std,
        trust_checkpoint=t.trust_checkpoint,
    )
    eval_set = load_eval_set(cfg.eval_data, meta, cfg.eval_limit)
    return teacher.to(device).eval(), meta, eval_set, device


def build_context(cfg: QuantizeConfig, work_dir: Path) -> Context:
    """Load and validate the teacher and evaluation data (nothing is written)."""
    teacher, meta, eval_set, device = prepare(cfg)
    image_shape = _infer_image_shape(cfg.teacher, meta, eval_set)
    return Context(cfg, teacher, meta, image_shape, device, work_dir, eval_set)


def run_quantize(cfg: QuantizeConfig) -> dict[str, Any]:
    """Quantize, evaluate and write ``student.safetensors``, ``quant.json``, ``report.json/.md``."""
    started = time.perf_counter()
    _check_config(cfg)
    ctx = build_context(cfg, cfg.out)
    seed_everything(cfg.seed)
    with atomic_output_dir(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume) as work:
        ctx.work_dir = work
        result = METHODS[cfg.method](ctx)
        report = _build_report(ctx, result, started)
        _write_outputs(work, result.student, report)
    log.info("wrote %s", cfg.out)
    return report


def _score(model: nn.Module, eval_set: Dataset | None, device, progress: bool) -> EvalResult | None:
    if eval_set is None:
        return None
    return evaluate(model, eval_set, device=device, progress=progress)


def _build_report(ctx: Context, result: MethodResult, started: float) -> dict[str, Any]:
    cfg = ctx.config
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
        "calibration": "none",
        "quant_spec": cfg.quant.to_dict(),
        "image_shape": list(ctx.image_shape),
        "zsq_version": zsq.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }
    report.update(result.report)
    report["seconds"] = round(time.perf_counter() - started, 2)
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


def report_markdown(report: dict[str, Any]) -> str:
    bits = f"W{report['wbits'] or 32}A{report['abits'] or 32}"
    rows = [
        ("method", report["method"]),
        ("bits", bits),
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
    recipe = resolve_recipe(
        opts.get("recipe", "paper-cifar"),
        ait=opts.get("ait", False),
        overrides=opts.get("overrides"),
    )
    evaluate_fn = None
    if ctx.eval_set is not None:

        def evaluate_fn(student: nn.Module) -> float:
            return evaluate(student, ctx.eval_set, device=ctx.device, progress=False).top1

    student, history = zero_shot_quantize(
        ctx.teacher,
        image_shape=ctx.image_shape,
        num_classes=ctx.meta.num_classes,
        method=cfg.method,
        spec=cfg.quant,
        recipe=recipe,
        device=ctx.device,
        work_dir=ctx.work_dir,
        resume=cfg.resume,
        evaluate=evaluate_fn,
        progress=cfg.progress,
        execution=opts.get("execution"),
        source_options=opts.get("source_options"),
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
    }
    return MethodResult(student, report)


for _name in GENERATOR_METHODS:
    register_method(_name)(run_distillation)
