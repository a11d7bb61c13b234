"""The loss surface of a finished run's student, CE against KL (paper Sec. 3.2, Fig. 2).

``measure_hessian`` rebuilds the run's student and teacher, takes ONE batch (drawn from the run's
own trained generator, or real labelled images when ``data`` is given: for measurement only) and,
for each loss term, at the student's quantized-layer weights:

- ``ce``: cross-entropy against the teacher's argmax labels (synthetic data) or the true labels
  (real data);
- ``kl``: KL(teacher || student) at the run's temperature T, times T^2, with the run's reduction
  (``mean`` by default), as the student trained on it (``zsq.numerics.losses.kl_to_teacher``);

it computes the Hutchinson trace of the Hessian, its top eigenvalue(s) and eigenvector (power
iteration), the eigenvalue density (stochastic Lanczos quadrature, one run) and the loss along
the top eigenvector. The student is in eval mode with its activation ranges frozen, so every
Hessian-vector product sees the same function.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsq.analysis.runs import FinishedRun, finished_run
from zsq.errors import ConfigError, ZsqError
from zsq.numerics.gradients import cosine_similarity, flat_grad
from zsq.numerics.hessian import hutchinson_trace, loss_along, slq_density, top_eigenpairs
from zsq.runtime import resolve_device

log = logging.getLogger(__name__)

SURFACE_RADIUS = 0.02
"""The loss surface spans k in [-K, K] along the unit top eigenvector, K = SURFACE_RADIUS x the
norm of the measured weights: a step of up to 2% of the weights' size. For a CIFAR ResNet-20
(quantized weights of norm about 25) that is the paper's k in [-0.5, 0.5]; relative to the norm,
models of other sizes compare."""
DEFAULT_TEMPERATURE = 20.0


@dataclass(frozen=True)
class Batch:
    """The one batch every product sees: images, labels for CE, the teacher's logits."""

    images: Tensor
    labels: Tensor
    teacher_logits: Tensor
    description: str
    real: bool


@dataclass(frozen=True)
class HessianSettings:
    """How much to measure; checked on construction (see ``measure_hessian``)."""

    batch_size: int = 200
    probes: int = 100
    iters: int = 30
    top_k: int = 1
    surface_points: int = 21
    surface_radius: float = SURFACE_RADIUS
    seed: int = 0
    progress: bool = True
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, f"batch size {self.batch_size}; use at least 1 (200: paper)"),
            (self.probes >= 1, f"probes={self.probes}; use at least 1 (100 for a tight trace)"),
            (self.iters >= 1, f"iters={self.iters}; use at least 1 (30 is usual)"),
            (self.top_k >= 1, f"top_k={self.top_k}; ask for at least 1 eigenpair"),
            (
                self.surface_points >= 2,
                f"surface points {self.surface_points}; use at least 2 (21 is usual)",
            ),
            (
                self.surface_radius > 0,
                f"surface radius {self.surface_radius}; use a positive fraction (0.02)",
            ),
            (
                self.time_limit_s is None or self.time_limit_s > 0,
                f"time limit {self.time_limit_s}; give seconds > 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ZsqError(message)


def measure_hessian(
    run_dir: str | Path,
    *,
    batch_size: int = 200,
    probes: int = 100,
    iters: int = 30,
    top_k: int = 1,
    surface_points: int = 21,
    surface_radius: float = SURFACE_RADIUS,
    data: str | None = None,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    time_limit_s: float | None = None,
) -> dict[str, Any]:
    """Hessian trace, top eigenpairs, eigenvalue density and loss surface of CE and KL (JSON-ready).

    ``iters`` bounds both the power iterations per eigenpair and the Lanczos steps of the
    density. ``time_limit_s`` caps the Hutchinson loops: each loss term gets an equal share and
    stops after the probe that crosses it (the result says how many probes ran). ``weights``
    overrides the teacher weights the run's report names (for a path that no longer resolves);
    its sha256 must match the run's. ``seed`` fixes the synthetic draw, the real images chosen
    and the random probe vectors; the caller's global RNG state is restored afterwards.
    """
    settings = HessianSettings(
        batch_size,
        probes,
        iters,
        top_k,
        surface_points,
        surface_radius,
        seed,
        progress,
        time_limit_s,
    )
    started = time.perf_counter()
    dev = resolve_device(device) if isinstance(device, str) else device
    run = finished_run(run_dir)
    # Building the models and the generator draws random initial weights: fork the RNG so the
    # caller's state comes back as it was.
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        result = _measure(run, settings, data, weights, dev)
    return {**result, "seconds": round(time.perf_counter() - started, 2)}


def _measure(
    run: FinishedRun,
    settings: HessianSettings,
    data: str | None,
    weights: str | Path | None,
    dev: torch.device,
) -> dict[str, Any]:
    s = settings
    if data is None:
        _require_generator(run)
    student, info = _student(run, dev)
    teacher = _teacher(run, info, weights).to(dev)
    if data is None:
        batch = synthetic_batch(run, teacher, info, s.batch_size, s.seed, dev)
    else:
        batch = real_batch(data, teacher, info, s.batch_size, s.seed, dev)
    names, params = measured_weights(student)
    weight_norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))
    radius = s.surface_radius * weight_norm
    ks = torch.linspace(-radius, radius, s.surface_points, dtype=torch.float64).tolist()
    temperature, reduction = kl_settings(run)
    losses = loss_functions(student, batch, temperature, reduction)
    terms = {}
    for term, loss_fn in losses.items():
        log.info(
            "measuring the %s Hessian (%d weights, batch %d)", term, _count(params), s.batch_size
        )
        terms[term] = _measure_term(loss_fn, params, names, ks, s, len(losses))
    return {
        "run": str(run.folder),
        "method": run.method,
        "data": batch.description,
        "real_data": batch.real,
        "batch_size": s.batch_size,
        "seed": s.seed,
        "device": str(dev),
        "ce_labels": "true labels" if batch.real else "the teacher's argmax",
        "kl": {"temperature": temperature, "reduction": reduction, "times_T_squared": True},
        "student_agreement_on_batch": _agreement(student, batch),
        # the CE/KL gradient cosine at the final student on this batch: with --data, the
        # real-data reference for the per-step synthetic measurements (paper Fig. 1)
        "grad_cos_ce_kl": _finite(
            cosine_similarity(flat_grad(losses["ce"], params), flat_grad(losses["kl"], params))
        ),
        "parameters": {"layers": names, "count": _count(params), "weight_norm": weight_norm},
        "surface": {"k": ks, "radius": radius, "radius_over_weight_norm": s.surface_radius},
        "settings": {"probes": s.probes, "iters": s.iters, "top_k": s.top_k, "slq_runs": 1},
        "terms": terms,
    }


def _count(params: list[Tensor]) -> int:
    return sum(p.numel() for p in params)


# --- the run's models ---------------------------------------------------------------------------


def _run_source(run: FinishedRun) -> str | None:
    """The sample source a distillation run drew from (None for any other run)."""
    registered = run.registered
    if registered is None or registered.family != "distillation":
        return None
    return registered.config.SOURCE


def _keeps_pool(source: str) -> bool:
    """Whether the source is a pool of images (kept in the run folder), not a generator."""
    from zsq.synth import source_class

    return not source_class(source).trainable


def _require_generator(run: FinishedRun) -> None:
    source = _run_source(run)
    if source is None:
        raise ConfigError(
            f"{run.folder} is a {run.method} run: it has no generator to draw a synthetic batch "
            "from; give «data» (real images) to measure on",
        )
    if _keeps_pool(source):
        _pool_file(run)
    elif not run.layout.generator.is_file():
        raise ConfigError(
            f"{run.folder}: this run predates {run.layout.GENERATOR}; rerun it, or give «data» "
            "(real images) to measure on",
        )


def _pool_file(run: FinishedRun) -> Path:
    """The synthetic images a ViT run distilled on: kept in its folder, or where its
    ``cache`` source option put them."""
    cache = (run.report.get("source_options") or {}).get("cache")
    for path in (run.layout.pool, Path(cache) if cache else None):
        if path is not None and path.is_file():
            return path
    raise ConfigError(
        f"{run.folder}: the {run.base_method} images it distilled on are gone "
        f"({run.layout.POOL}{', ' + str(cache) if cache else ''}); give «data» (real images) to "
        "measure on",
    )


def _student(run: FinishedRun, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The run's student in eval mode, activation ranges frozen, only its weights trainable."""
    from zsq.run.finished import student_from_run

    student, info = student_from_run(run.folder)
    student = student.to(device).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return student, info


def _teacher(run: FinishedRun, info: dict[str, Any], weights: str | Path | None) -> nn.Module:
    from zsq.io import sha256_file
    from zsq.models import load_teacher

    path = Path(weights) if weights is not None else _report_weights(run)
    if not path.is_file():
        raise ConfigError(
            f"the run's teacher weights {path} are not found from here; run from the folder the "
            "run was made in, or give the file («weights»)"
        )
    expected = run.options.get("teacher.weights_sha256")
    if expected and sha256_file(path) != expected:
        raise ConfigError(
            f"{path} is not the teacher this run distilled from (its sha256 differs from the "
            "run's); give the run's teacher weights («weights»)"
        )
    teacher, _ = load_teacher(
        info["name"],
        path,
        num_classes=info["num_classes"],
        in_channels=info["in_channels"],
        normalize_mean=info.get("normalize_mean"),
        normalize_std=info.get("normalize_std"),
    )
    return teacher.eval()


def _report_weights(run: FinishedRun) -> Path:
    weights = run.report.get("weights")
    if not weights:
        raise ZsqError(
            f"{run.folder}: the run's teacher had no weights file (random init); its Hessian "
            "would measure nothing useful"
        )
    return Path(weights)


def measured_weights(student: nn.Module) -> tuple[list[str], list[Tensor]]:
    """Names and weights of the quantized layers (weight bits set), made trainable."""
    from zsq.quant import quant_layers

    layers = [(name, layer) for name, layer in quant_layers(student) if layer.wbits is not None]
    if not layers:
        raise ZsqError("the student has no weight-quantized layer; nothing to measure")
    for _, layer in layers:
        layer.weight.requires_grad_(True)
    return [name for name, _ in layers], [layer.weight for _, layer in layers]


# --- the batch ----------------------------------------------------------------------------------


@torch.no_grad()
def synthetic_batch(
    run: FinishedRun,
    teacher: nn.Module,
    info: dict[str, Any],
    batch_size: int,
    seed: int,
    device: torch.device,
) -> Batch:
    """A batch from the run's own sample source: its trained generator (``generator.safetensors``)
    or, for a ViT method, its pool of synthesised images; drawn under ``seed`` with the global
    RNG state restored afterwards. CE labels are the teacher's argmax."""
    from zsq.synth import build_source

    source_name = _run_source(run)
    pool_source = _keeps_pool(source_name)
    options = dict(run.report.get("source_options") or {})
    if pool_source:
        pool = _pool_file(run)
        options.update(cache=pool, progress=False)
        what = f"{batch_size} of the run's {run.base_method} images ({pool.name})"
    else:
        what = f"{batch_size} images from the run's trained {run.base_method} generator"
        what += f" ({run.layout.GENERATOR})"
    source = build_source(
        source_name,
        teacher,
        num_classes=info["num_classes"],
        image_shape=info["image_shape"],
        **options,
    )
    try:
        if not pool_source:
            _load_generator(source, run)
        source = source.to(device)
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(seed)
            images = source.sample(batch_size).images.float()
    finally:
        source.close()
    logits = teacher(images)
    return Batch(images, logits.argmax(1), logits, f"synthetic: {what}, seed {seed}", real=False)


def _load_generator(source: nn.Module, run: FinishedRun) -> None:
    from zsq.io import read_safetensors

    try:
        source.load_state_dict(read_safetensors(run.layout.generator)[0])
    except RuntimeError as err:
        raise ZsqError(
            f"{run.layout.generator} does not fit the run's {run.base_method} source "
            f"({str(err).splitlines()[0]}); rerun the quantize"
        ) from None


@torch.no_grad()
def real_batch(
    spec: str,
    teacher: nn.Module,
    info: dict[str, Any],
    batch_size: int,
    seed: int,
    device: torch.device,
) -> Batch:
    """``batch_size`` labelled test images of ``spec``, chosen by a generator seeded with
    ``seed`` (a sorted dataset would otherwise give one class). For measurement only."""
    from zsq.data import load_dataset_for

    dataset = load_dataset_for(spec, info)
    if len(dataset) < batch_size:
        raise ConfigError(f"{spec} has {len(dataset)} test images; use «batch_size» {len(dataset)}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    samples = [dataset[int(i)] for i in order[:batch_size]]
    images = torch.stack([image for image, _ in samples]).to(device)
    labels = torch.tensor([int(label) for _, label in samples], device=device)
    description = (
        f"real: {batch_size} labelled test images of {spec} (seed {seed}), used for measurement "
        "only"
    )
    return Batch(images, labels, teacher(images), description, real=True)


# --- the losses ---------------------------------------------------------------------------------


def kl_settings(run: FinishedRun) -> tuple[float, str]:
    """The temperature and reduction the run's KL term used (recipe fields; 20 and mean)."""
    recipe = run.report.get("recipe") or {}
    temperature = recipe.get("temperature", recipe.get("kl_temperature", DEFAULT_TEMPERATURE))
    return float(temperature), str(recipe.get("kl_reduction", "mean"))


def loss_functions(
    student: nn.Module, batch: Batch, temperature: float, reduction: str
) -> dict[str, Any]:
    """Zero-argument CE and KL losses of ``student`` on ``batch``."""
    from zsq.numerics.losses import kl_to_teacher

    def ce() -> Tensor:
        return F.cross_entropy(student(batch.images), batch.labels)

    def kl() -> Tensor:
        return kl_to_teacher(student(batch.images), batch.teacher_logits, temperature, reduction)

    return {"ce": ce, "kl": kl}


@torch.no_grad()
def _agreement(student: nn.Module, batch: Batch) -> float:
    """Top-1 agreement (%) of the student with the CE labels on the batch."""
    predicted = student(batch.images).argmax(1)
    return round(float((predicted == batch.labels).float().mean()) * 100, 2)


# --- one term -----------------------------------------------------------------------------------


def _measure_term(
    loss_fn: Any,
    params: list[Tensor],
    names: list[str],
    ks: list[float],
    s: HessianSettings,
    terms: int,
) -> dict[str, Any]:
    """One loss term; the trace gets ``1/terms`` of the time limit."""
    limit = None if s.time_limit_s is None else s.time_limit_s / terms
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 2)
        clock = now

    with torch.no_grad():
        loss = float(loss_fn())
    trace = hutchinson_trace(
        loss_fn, params, probes=s.probes, seed=s.seed, progress=s.progress, time_limit_s=limit
    )
    lap("trace")
    k = min(s.top_k, _count(params))
    values, vectors = top_eigenpairs(
        loss_fn, params, k=k, iters=s.iters, seed=s.seed, progress=s.progress
    )
    lap("eigenpairs")
    density = slq_density(loss_fn, params, iters=s.iters, runs=1, seed=s.seed, progress=s.progress)
    lap("density")
    surface = loss_along(loss_fn, params, vectors[0], ks, progress=s.progress)
    lap("surface")
    return {
        "loss": loss,
        "trace": {
            "mean": trace.mean,
            "std_error": _finite(trace.std_error),
            "probes": trace.probes,
        },
        "top_eigenvalues": values,
        "top_eigenvector_layer_share": _layer_share(vectors[0], names),
        "density": {
            "nodes": density.nodes[0].tolist(),
            "weights": density.weights[0].tolist(),
            "dim": density.dim,
        },
        "surface": surface,
        "seconds": seconds,
    }


def _finite(value: float) -> float | None:
    """NaN (e.g. one probe's standard error) as null: JSON has no NaN."""
    return None if math.isnan(value) else value


def _layer_share(vector: list[Tensor], names: list[str]) -> dict[str, float]:
    """Where the unit eigenvector lives: its squared norm per layer (sums to 1)."""
    squares = [float(t.double().pow(2).sum()) for t in vector]
    total = sum(squares) or 1.0
    return {name: s / total for name, s in zip(names, squares, strict=True)}
