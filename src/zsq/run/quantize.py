"""One run of one method, the same for the Python API and the CLI: check everything once, load
the data, run the method, evaluate, report, and (with a ``work_dir``) write the run folder
atomically, resumably and under a lock.

    import zsq
    result = zsq.quantize(teacher, zsq.GDFQ(ait=True, recipe="short"), image_shape=(3, 32, 32),
                          num_classes=10, work_dir="runs/ait")
    result.student, result.report, result.history
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from zsq import distributed
from zsq.data import eval_transform, head, load_dataset_for
from zsq.errors import ConfigError
from zsq.evaluate import EvalResult, evaluate
from zsq.execution import Execution
from zsq.io import (
    run_folder,
    save_safetensors,
    write_json,
    write_marker,
    write_text,
)
from zsq.layout import RunLayout
from zsq.methods.base import (
    Context,
    Method,
    MethodConfig,
    dataset_label,
    get_method,
    method_names,
    method_of,
)
from zsq.mixed.allocate import MixedConfig
from zsq.models import ModelMeta, input_channels
from zsq.models.checkpoint import check_image_size
from zsq.quant import QuantSpec, check_layer_patterns, inspect_forward, quant_params
from zsq.quant.placement import input_placements, resolve_placement
from zsq.run import record
from zsq.run.allocation import check_budget, run_allocation
from zsq.run.report import build_report, report_markdown
from zsq.run.scores import teacher_scores
from zsq.runtime import device_description, resolve_device, seed_everything
from zsq.synth import require_fit
from zsq.synth.base import check_image_shape, check_num_classes

log = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1  # torch.manual_seed's range


@dataclass
class QuantizeResult:
    """What a run made: the student, the report (``report.json``), and the per-epoch history of a
    distillation (empty for a post-training method)."""

    student: nn.Module
    report: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Plan:
    """A run with every argument checked and resolved; nothing loaded or written yet. ``ctx``
    is what the method will receive, less the run folder and the data."""

    ctx: Context
    method: MethodConfig
    registered: Method
    mixed: MixedConfig | None
    meta: ModelMeta
    eval_data: str | Dataset | None
    eval_limit: int | None
    download: bool
    work_dir: Path | None
    overwrite: bool


def quantize(
    teacher: nn.Module,
    method: MethodConfig,
    *,
    image_shape: Sequence[int],
    num_classes: int,
    quant: QuantSpec | None = None,
    mixed: MixedConfig | None = None,
    meta: ModelMeta | None = None,
    eval_data: str | Dataset | None = None,
    eval_limit: int | None = None,
    download: bool = False,
    work_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> QuantizeResult:
    """A fake-quantized student of ``teacher``, made without its training data by ``method``
    (a config: :class:`~zsq.methods.MinMax`, :class:`~zsq.methods.GDFQ`, ...).

    ``image_shape`` (channels, height, width) and ``num_classes``: what the teacher takes and
    returns. ``quant``: bit widths and scheme (default W4A4, per-channel asymmetric weights, the
    ``auto`` activation placement); ``mixed``: per-layer widths chosen under a budget first.
    ``meta``: what else describes the teacher (normalisation, to read dataset specs; its name and
    weights file, so that ``zsq export`` can rebuild the student); the CLI gives the one it
    loaded.
    ``eval_data``: a dataset spec or a labelled Dataset, measured only (the report's top-1, the
    log of a distillation), never trained on; ``eval_limit`` its first images.
    ``work_dir``: the run folder, written atomically (``WORK_DIR.partial`` meanwhile, with a
    checkpoint a resume continues from): the student, ``quant.json``, ``report.json/.md``; a
    folder that exists is replaced only with ``overwrite`` and only when it is a zsq run.
    ``resume``: continue the interrupted run in ``work_dir`` exactly (the same options).
    ``seed`` seeds every random generator first. Every argument is checked before any work.
    """
    started = time.perf_counter()
    plan = _plan(
        teacher, method, image_shape, num_classes, quant, mixed, meta, eval_data, eval_limit,
        download, work_dir, overwrite, resume, seed, device, progress,
    )  # fmt: skip
    plan = _for_this_rank(plan)
    options = _run_options(plan)
    with contextlib.ExitStack() as stack:

        def open_folder() -> tuple[Path, list[float]]:  # rank 0's: it checks and writes
            work = stack.enter_context(_open_folder(plan))
            resumed = (
                record.sessions_before(plan.work_dir, work, options) if plan.ctx.resume else []
            )
            return work, resumed

        # the folder first (checked under its lock), then what needs the teacher and the data
        work, previous = distributed.on_main(open_folder) if plan.work_dir else (None, [])
        _check_teacher(plan)
        if plan.ctx.resume and work is not None:
            options = record.check_resumed_placement(work, plan.work_dir, plan.ctx.quant, options)
        data = _load_datasets(plan)
        layout = RunLayout(work) if work is not None else None
        if layout is None or not distributed.world().is_main:  # rank 0 alone writes
            return _execute(plan, data, layout, previous, started)
        write_marker(work, record.marker_record(options, previous))
        try:
            result = _execute(plan, data, layout, previous, started)
        except BaseException:  # the time this session spent counts when the run is resumed
            with contextlib.suppress(OSError):
                sessions = [*previous, _seconds_since(started)]
                write_marker(work, record.marker_record(options, sessions))
            raise
        _write_outputs(layout, result)
        digests = record.file_digests(work)
        write_marker(work, record.marker_record(options, result.report["sessions"], digests))
    log.info("wrote %s", plan.work_dir)
    return result


# --- checks (each once per run, before any work) --------------------------------------------
def _plan(
    teacher: Any,
    method: Any,
    image_shape: Any,
    num_classes: Any,
    quant: Any,
    mixed: Any,
    meta: Any,
    eval_data: Any,
    eval_limit: Any,
    download: Any,
    work_dir: Any,
    overwrite: Any,
    resume: Any,
    seed: Any,
    device: Any,
    progress: Any,
) -> _Plan:
    """Every argument checked (types, ranges, how they combine) and resolved."""
    if not isinstance(teacher, nn.Module):
        raise ConfigError(
            f"teacher must be a torch.nn.Module, got {type(teacher).__name__} {teacher!r:.60}; "
            "load one first, e.g. zsq.models.load_teacher('resnet20', 'weights.pt')"
        )
    if not isinstance(method, MethodConfig):
        raise ConfigError(
            f"«method» must be a method config such as zsq.GDFQ() or zsq.MinMax(), got "
            f"{type(method).__name__} {method!r:.60}; methods: {', '.join(method_names())}",
        )
    registered = method_of(method)
    shape = check_image_shape(image_shape)
    check_image_size(max(shape[1:]))
    check_num_classes(num_classes)
    quant = QuantSpec() if quant is None else quant
    _typed("quant", quant, QuantSpec, "a zsq.quant.QuantSpec")
    if mixed is not None:
        _typed("mixed", mixed, MixedConfig, "a zsq.mixed.MixedConfig")
    meta = _meta(meta, shape, num_classes)
    _check_eval(eval_data, eval_limit)
    if download and not _names_a_spec(method, eval_data):
        raise ConfigError(
            "«download» has no effect without a dataset spec («eval_data», «calib»); drop it",
        )
    _whole("seed", seed, 0, MAX_SEED)
    folder = _work_dir(work_dir, overwrite, resume)
    ctx = Context(
        teacher, shape, num_classes, quant, resolve_device(device), seed, bool(progress),
        resume=bool(resume),
    )  # fmt: skip
    return _Plan(
        ctx, method, registered, mixed, meta, eval_data, eval_limit, bool(download), folder,
        bool(overwrite),
    )  # fmt: skip


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole(name: str, value: Any, low: int, high: int | None = None) -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"«{name}» must be a whole number {bound}, got {value!r:.60}")


def _typed(name: str, value: Any, kind: type, what: str) -> None:
    if not isinstance(value, kind):
        raise ConfigError(f"«{name}» must be {what}, got {value!r:.60}")


def _meta(meta: Any, shape: tuple[int, int, int], num_classes: int) -> ModelMeta:
    """``meta`` completed by the shape and class count, which it must agree with."""
    if meta is None:
        return ModelMeta(num_classes=num_classes, in_channels=shape[0], image_size=shape[1])
    _typed("meta", meta, ModelMeta, "a zsq.models.ModelMeta")
    for name, given, expected in (
        ("num_classes", meta.num_classes, num_classes),
        ("in_channels", meta.in_channels, shape[0]),
    ):
        if given is not None and given != expected:
            raise ConfigError(
                f"«meta» says {name}={given} but the run has {expected}; give one value",
            )
    return replace(meta, num_classes=num_classes, in_channels=shape[0])


def _check_eval(eval_data: Any, eval_limit: Any) -> None:
    if eval_data is not None and not isinstance(eval_data, (str, Dataset)):
        raise ConfigError(
            f"«eval_data» must be a dataset spec or a labelled Dataset, got {eval_data!r:.60}",
        )
    if eval_limit is None:
        return
    if eval_data is None:
        raise ConfigError(
            "«eval_limit» has no effect without «eval_data»; drop it or add the data",
        )
    if not _is_int(eval_limit) or eval_limit < 1:
        raise ConfigError(
            f"«eval_limit» must be >= 1, got {eval_limit!r:.60}; leave it out to evaluate every "
            "image",
        )


def _names_a_spec(method: MethodConfig, eval_data: Any) -> bool:
    return isinstance(eval_data, str) or bool(method.datasets())


def _work_dir(work_dir: Any, overwrite: Any, resume: Any) -> Path | None:
    if work_dir is None:
        for name, given in (("resume=True", resume), ("overwrite=True", overwrite)):
            if given:
                raise ConfigError(f"«{name}» needs the run's «work_dir»")
        return None
    if not isinstance(work_dir, (str, Path)):
        raise ConfigError(f"«work_dir» must be a path, got {work_dir!r:.60}")
    return Path(work_dir).expanduser()


def _for_this_rank(plan: _Plan) -> _Plan:
    """Under torchrun: the rank's device (its own GPU under NCCL) and progress on rank 0 only;
    a method that does not run over several processes is refused."""
    current = distributed.world()
    if not current.active:
        return plan
    for name, config in (("method", plan.method), ("init", getattr(plan.method, "init", None))):
        if config is not None and not method_of(config).handler.multi_process:
            raise ConfigError(
                f"«{name}» {config.method} runs in one process (it takes minutes, not "
                "GPU-days); start it without torchrun, or use a distillation method over several "
                "processes"
            )
    plan.ctx.device = resolve_device(distributed.device_for(str(plan.ctx.device), current))
    plan.ctx.progress = plan.ctx.progress and current.is_main
    return plan


def _check_teacher(plan: _Plan) -> None:
    """What needs the teacher: it takes the shape and returns the classes, the layer patterns
    match it, the sample sources can draw from it, the method's own checks, the budget."""
    teacher = plan.ctx.teacher.to(plan.ctx.device).eval()
    plan.ctx.teacher = teacher
    expected = input_channels(teacher)
    if expected is not None and expected != plan.ctx.image_shape[0]:
        raise ConfigError(
            f"«image_shape» has {plan.ctx.image_shape[0]} channel(s) but the model's first "
            f"layer takes {expected}; give «in_channels|image_shape channels» {expected}",
        )
    check_layer_patterns(teacher, plan.ctx.quant)
    logits = inspect_forward(teacher, plan.ctx.image_shape)  # a refused shape: one line, no work
    _check_class_count(logits, plan.ctx.num_classes)
    plan.ctx.quant = resolve_placement(teacher, plan.ctx.quant, plan.ctx.image_shape)
    configs = [plan.method, getattr(plan.method, "init", None)]
    for source, where in plan.method.sample_sources():
        require_fit(source, teacher, where)
    if plan.mixed is not None and plan.mixed.bits_from is None:
        require_fit(plan.mixed.source, teacher, f"the allocation's source {plan.mixed.source}")
    if plan.mixed is not None and plan.mixed.bits_from is not None:
        record.check_bits_source(plan.mixed.bits_from)
    for config in configs:
        if config is None:
            continue
        handler = method_of(config).handler
        if handler.learns_quantization and plan.mixed is None:  # an allocation sets widths
            _refuse_full_precision(config.method, handler.spec(config, plan.ctx.quant, teacher))
        handler.check(config, plan.ctx)
    if plan.mixed is not None:
        check_budget(plan.mixed, plan.method, teacher, plan.ctx.image_shape, plan.ctx.quant)


def _refuse_full_precision(method: str, spec: QuantSpec) -> None:
    """A method that learns ranges or rounding has nothing to learn on a full-precision student."""
    if spec.quantizes_nothing():
        raise ConfigError(
            f"{method} has nothing to quantize: «wbits» and «abits» are both off and no "
            "«quant overrides|layer override» sets a width; give a weight or activation width"
        )


def _check_class_count(logits: Any, num_classes: int) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] != num_classes:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigError(
            f"the teacher's output on one image is {shape}, not (1, num_classes={num_classes}); "
            "give the teacher's number of classes («num_classes»)",
        )


# --- data ---------------------------------------------------------------------------------------
@dataclass
class _Data:
    eval_set: Dataset | None
    datasets: dict[str, Dataset]


def _load_datasets(plan: _Plan) -> _Data:
    """The evaluation data and the real datasets the method names, read before any work (a
    wrong path or a misfit fails first)."""
    info = input_space(plan.meta, plan.ctx.image_shape)
    options = {"download": plan.download}
    eval_set = plan.eval_data
    if isinstance(eval_set, str):
        eval_set = load_dataset_for(eval_set, info, "test", **options, limit=plan.eval_limit)
    elif eval_set is not None and plan.eval_limit is not None:
        eval_set = head(eval_set, plan.eval_limit)
    named = {s: load_dataset_for(s, info, "train", **options) for s, _ in plan.method.datasets()}
    return _Data(eval_set, named)


def input_space(meta: ModelMeta, image_shape: Sequence[int]) -> dict[str, Any]:
    """What :func:`zsq.data.load_dataset_for` needs to read data as the teacher takes it."""
    return {
        "image_shape": list(image_shape),
        "num_classes": meta.num_classes,
        "normalize_mean": meta.normalize_mean,
        "normalize_std": meta.normalize_std,
    }


# --- the run ------------------------------------------------------------------------------------
def _run_options(plan: _Plan) -> dict[str, Any]:
    world = distributed.world()
    eval_data = plan.eval_data
    return record.run_options(
        plan.method,
        quant=plan.ctx.quant,
        meta=plan.meta,
        image_shape=plan.ctx.image_shape,
        seed=plan.ctx.seed,
        eval_data=eval_data if not isinstance(eval_data, Dataset) else dataset_label(eval_data),
        eval_limit=plan.eval_limit,
        mixed=plan.mixed,
        world_size=world.size if world.active else None,
    )


def _open_folder(plan: _Plan) -> contextlib.AbstractContextManager[Path]:
    entries = (*RunLayout.COMMON_ENTRIES, *_method_files())
    return run_folder(
        plan.work_dir, overwrite=plan.overwrite, resume=plan.ctx.resume, entries=entries
    )


def _method_files() -> list[str]:
    return [name for m in method_names() for name in get_method(m).handler.writes]


def _execute(
    plan: _Plan,
    data: _Data,
    layout: RunLayout | None,
    previous: list[float],
    started: float,
) -> QuantizeResult:
    """Seed, allocate the bits (if asked), run the method, evaluate and report."""
    distributed.begin_work()
    seed_everything(plan.ctx.seed)
    ctx = replace(plan.ctx, layout=layout, dataset=data.datasets.__getitem__)
    ctx.evaluate = _evaluator(data.eval_set, plan.ctx.device)
    allocation = None
    execution = getattr(plan.method, "execution", None) or Execution()
    # fp32 means fp32: no cuDNN TF32 (PyTorch's default for convolutions) in the allocation, the
    # method's work (a post-training method's included) or the report's scores
    with execution.tensor_core_scope():
        if plan.mixed is not None:
            allocation = distributed.broadcast_object(
                run_allocation(plan.mixed, ctx, layout) if distributed.world().is_main else None
            )
            ctx.quant = allocation.apply(ctx.quant)
        outcome = plan.registered.handler.run(plan.method, ctx)
        scores = _scores(plan, data.eval_set, outcome.student)
    quant = outcome.quant or ctx.quant
    report = build_report(
        method=plan.method.method,
        quant=quant,
        model=plan.meta.model,
        weights=plan.meta.weights,
        eval_data=_eval_text(plan.eval_data),
        scores=scores,
        seed=plan.ctx.seed,
        device=device_description(plan.ctx.device),
        world=distributed.world().describe(),
        image_shape=plan.ctx.image_shape,
        eval_transform=eval_transform(data.eval_set) if data.eval_set is not None else None,
        outcome=outcome.report,
        student=outcome.student,
        allocation=allocation,
        sessions=[*previous, _seconds_since(started)],
    )
    report["input_placement"] = input_placements(
        plan.ctx.teacher, outcome.student, quant, plan.ctx.image_shape
    )
    return QuantizeResult(outcome.student, report, outcome.history)


def _evaluator(
    eval_set: Dataset | None, device: torch.device
) -> Callable[[nn.Module], float] | None:
    if eval_set is None:
        return None

    def top1(student: nn.Module) -> float:
        return evaluate(student, eval_set, device=device, progress=False, distributed=True).top1

    return top1


def _scores(plan: _Plan, eval_set: Dataset | None, student: nn.Module) -> dict[str, Any]:
    if eval_set is None:
        return {
            "teacher_top1": None,
            "teacher_top5": None,
            "student_top1": None,
            "student_top5": None,
            "n_eval": 0,
        }
    options = {"device": plan.ctx.device, "progress": plan.ctx.progress, "distributed": True}

    def measure() -> EvalResult:
        return evaluate(plan.ctx.teacher, eval_set, **options)

    cached = False
    if isinstance(plan.eval_data, str) and not distributed.world().active:
        spec, transform = plan.eval_data, eval_transform(eval_set)
        meta = plan.meta
        model = {
            "name": meta.model, "kwargs": meta.model_kwargs,
            "mean": meta.normalize_mean, "std": meta.normalize_std,
        }  # fmt: skip
        key = (plan.ctx.teacher, spec, len(eval_set), transform, plan.ctx.device)
        teacher, cached = teacher_scores(*key, measure, model)
    else:
        teacher = measure()
    ours = evaluate(student, eval_set, **options)
    return {
        "teacher_top1": teacher.top1,
        "teacher_top5": teacher.top5,
        "teacher_score": "measured before, same teacher and data (cache)" if cached else "measured",
        "student_top1": ours.top1,
        "student_top5": ours.top5,
        "n_eval": ours.n,
    }


def _eval_text(eval_data: str | Dataset | None) -> str | None:
    if eval_data is None or isinstance(eval_data, str):
        return eval_data
    return dataset_label(eval_data)


def _write_outputs(layout: RunLayout, result: QuantizeResult) -> None:
    from zsq._version import __version__

    save_safetensors(result.student.state_dict(), layout.student, {"zsq": __version__})
    placements = {"input_placement": result.report.get("input_placement", {})}
    write_json(layout.quant, {**quant_params(result.student), **placements})
    write_json(layout.report, result.report)
    write_text(layout.report_md, report_markdown(result.report))


def _seconds_since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


__all__ = ["QuantizeResult", "quantize"]
