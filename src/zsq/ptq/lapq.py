"""LAPQ, loss-aware post-training quantization (Nahshan et al., the second seed paper).

Per tensor, one clipping value alpha: weights symmetric in [-alpha, alpha], post-ReLU
activations unsigned in [0, alpha] (an activation that takes negative values, e.g. the image
under ``act_placement="input"``, gets [-alpha, alpha]). Three phases, then bias correction:

1. **layer-wise** (paper Eq. 12): each alpha minimises ``mean |Q_alpha(x) - x|^p`` on its own
   tensor (weights, or activations of the full-precision model on the calibration images): a
   scalar minimisation, a coarse grid then Brent's method inside the best bracket;
2. **quadratic p**: the calibration loss of the layer-wise solution is measured for each p of a
   grid (2..4, 10 points), a parabola is fitted and its minimum p* (kept inside the grid) gives
   the starting clips;
3. **joint Powell**: scipy's Powell method over all clipping values at once (each in units of
   its starting value), ``maxiter`` 1 as the reference, on the calibration loss;
4. **bias correction** (Banner et al.): each quantized layer's weights get a per-output-channel
   shift that makes the mean of the weight quantization error zero; applied at every loss
   evaluation, so the phases optimise the model that is deployed.

The calibration loss is cross-entropy against labels on real images, and KL(teacher || student)
(T = 1) on synthetic ones, which have no labels. Every forward of the loss reuses the
calibration batches on the device and the teacher's outputs, computed once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize, minimize_scalar
from torch import Tensor, nn
from tqdm.auto import tqdm

from zsq.errors import ZsqError
from zsq.options import flag, number, numbers, one_of, optional, read_options, whole_number
from zsq.ptq.calibration import CalibrationSet
from zsq.quant import (
    QuantSpec,
    act_quantizers,
    dequantize,
    qparams_from_range,
    quant_layers,
    quantize_codes,
    quantize_model,
)
from zsq.quant.modules import QuantConv2d, QuantLinear

log = logging.getLogger(__name__)

LAYER_POLICIES = ("all", "paper")
STAGES = ("lw", "lw+qa", "lw+qa+powell")
CACHE_BYTES = 4 * 2**30  # the most activation memory the Powell cache may keep
P_GRID = tuple(round(float(p), 4) for p in np.linspace(2.0, 4.0, 10))


@dataclass(frozen=True)
class LapqConfig:
    """LAPQ's options.

    ``layers``: ``all`` quantizes every Conv2d/Linear (AIT's setting, comparable across zsq's
    methods); ``paper`` leaves the first conv, the last conv and the last Linear in full
    precision (weights, and their inputs under ``act_placement="input"``), as the reference.
    ``stages``: how far to go (the paper's Table 3 ablation): ``lw`` is layer-wise clipping at
    ``lw_p``, ``lw+qa`` adds the quadratic choice of p, ``lw+qa+powell`` the joint optimisation.
    ``maxiter``/``maxfev``/``xtol``: Powell's iterations, its cap on loss evaluations (None: no
    cap) and its line-search tolerance in units of each starting clip (ours: 1%).
    ``max_samples``: elements per tensor kept for the layer-wise fits (a seeded random subset).
    Values may also be given as ``KEY=VALUE`` text reads them (``p_grid="2,3,4"``).
    """

    layers: str = "all"
    stages: str = "lw+qa+powell"
    p_grid: tuple[float, ...] = P_GRID
    lw_p: float = 2.0
    maxiter: int = 1
    maxfev: int | None = None
    xtol: float = 1e-2
    bias_correction: bool = True
    max_samples: int = 2**18
    batch_size: int = 256

    def __post_init__(self) -> None:
        own = {f.name: getattr(self, f.name) for f in fields(LapqConfig)}
        for name, value in read_options("LAPQ", LAPQ_RULES, own).items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """LAPQ's own options (a subclass's other fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(LapqConfig)}


LAPQ_RULES = {
    "layers": one_of(LAYER_POLICIES, "paper", "a layer policy, one"),
    "stages": one_of(STAGES, "lw+qa", "stages, one"),
    "p_grid": numbers(3, "at least 3 numbers > 0", lambda p: p > 0, "2,2.5,3,3.5,4"),
    "lw_p": number("> 0", lambda p: p > 0, 2.0),
    "maxiter": whole_number(1, 1),
    "maxfev": optional(whole_number(1, 200), "no cap"),
    "xtol": number("in (0, 1)", lambda x: 0 < x < 1, 0.01),
    "bias_correction": flag(True),
    "max_samples": whole_number(1000, 2**18),
    "batch_size": whole_number(1, 256),
}


# --- one tensor: the Lp-optimal clip ------------------------------------------------------------
def _quant_range(alpha: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    return (torch.zeros_like(alpha), alpha) if kind == "unsigned" else (-alpha, alpha)


def clip_quantize(x: Tensor, alpha: Tensor, bits: int, kind: str) -> Tensor:
    """``x`` quantized with clip ``alpha`` exactly as the zsq quantizer does it (``kind``:
    ``weight`` symmetric, ``unsigned`` [0, alpha], ``signed`` [-alpha, alpha])."""
    lo, hi = _quant_range(alpha, kind)
    scale, zero_point = qparams_from_range(lo, hi, bits, symmetric=kind == "weight")
    return dequantize(quantize_codes(x, scale, zero_point, bits), scale, zero_point)


def clip_errors(x: Tensor, alphas: Tensor, bits: int, kind: str, p: float) -> Tensor:
    """``mean |Q_alpha(x) - x|^p`` for each alpha of ``alphas`` (1-D), over the flat ``x``."""
    x = x.reshape(1, -1)
    out = []
    for chunk in alphas.reshape(-1, 1).split(max(1, 2**24 // x.shape[1])):
        out.append((clip_quantize(x, chunk, bits, kind) - x).abs().pow(p).mean(dim=1))
    return torch.cat(out)


def lp_optimal_clip(x: Tensor, bits: int, p: float, kind: str, grid: int = 40) -> float:
    """The clipping value minimising ``mean |Q_alpha(x) - x|^p``: the best of a ``grid`` over
    (0, max], refined by bounded Brent inside its neighbours."""
    x = x.detach().float().flatten()
    top = float(x.max() if kind == "unsigned" else x.abs().max())
    if top <= 0:
        return 1e-8
    candidates = torch.linspace(top / grid, top, grid, dtype=x.dtype, device=x.device)
    errors = clip_errors(x, candidates, bits, kind, p)
    best = int(errors.argmin())
    lo = float(candidates[best - 1]) if best > 0 else top / (4 * grid)
    hi = float(candidates[min(best + 1, grid - 1)])

    def error(alpha: float) -> float:
        return float(clip_errors(x, x.new_tensor([alpha]), bits, kind, p)[0])

    found = minimize_scalar(error, bounds=(lo, hi), method="bounded", options={"xatol": top * 1e-5})
    return float(found.x) if found.fun <= float(errors[best]) else float(candidates[best])


def quadratic_minimum(ps: np.ndarray | list[float], losses: np.ndarray | list[float]) -> float:
    """The minimum of the parabola fitted to (p, loss), kept inside [min p, max p]; the grid's
    best p when the fit opens downwards (no minimum)."""
    ps, losses = np.asarray(ps, dtype=float), np.asarray(losses, dtype=float)
    a, b, _ = np.polyfit(ps, losses, 2)
    if a <= 0:
        return float(ps[np.argmin(losses)])
    return float(np.clip(-b / (2 * a), ps.min(), ps.max()))


def bias_correct(layer: QuantConv2d | QuantLinear) -> None:
    """Shift each output channel of the fake-quantized weights by minus the mean of its
    quantization error, so the per-channel mean of (deployed - float) weights is zero."""
    layer.set_weight_offset(None)
    with torch.no_grad():
        error = layer.fake_quant_weight() - layer.weight
        layer.set_weight_offset(-error.flatten(1).mean(dim=1))


# --- the student ---------------------------------------------------------------------------
def lapq_spec(spec: QuantSpec, model: nn.Module, layers: str = "all") -> QuantSpec:
    """``spec`` with LAPQ's weight scheme (symmetric, one range per tensor) and, for the
    ``paper`` policy, the first conv, last conv and last Linear in full precision."""
    overrides = dict(spec.overrides)
    if layers == "paper":
        for name in paper_full_precision_layers(model):
            overrides[name] = {"wbits": None, "abits": None}
    return replace(spec, per_channel=False, w_symmetric=True, overrides=overrides)


def paper_full_precision_layers(model: nn.Module) -> list[str]:
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [*convs[:1], *convs[-1:], *linears[-1:]]
    return list(dict.fromkeys(chosen))


@dataclass
class _Clip:
    """One clipping value to find: a layer's weights or an activation quantizer's input."""

    name: str
    kind: str  # weight | unsigned | signed
    bits: int
    module: nn.Module
    samples: Tensor
    top: float  # largest useful clip (max |x|)


class Lapq:
    """LAPQ on ``teacher``: builds the student, finds every clip, returns student and report."""

    def __init__(
        self,
        teacher: nn.Module,
        spec: QuantSpec,
        calib: CalibrationSet,
        config: LapqConfig | None = None,
        *,
        device: torch.device | str = "cpu",
        progress: bool = True,
    ) -> None:
        self.config = config or LapqConfig()
        self.device = torch.device(device)
        self.progress = progress
        self.teacher = teacher.to(self.device).eval()
        spec = lapq_spec(spec, teacher, self.config.layers)
        self.student = quantize_model(teacher, spec, calib.images.shape[1:])
        self.student.to(self.device).eval()
        self.calib = calib
        self.batches = list(calib.batches(self.config.batch_size, self.device))
        self.targets = self._targets()
        self.seconds: dict[str, float] = {}
        self.evaluations = 0
        started = time.perf_counter()
        self.clips = self._clip_targets()
        self._current = [float("nan")] * len(self.clips)
        self._setup_cache()
        self.seconds["collect"] = _since(started)
        if not self.clips:
            raise ZsqError(
                "LAPQ found no quantized weight or activation to clip; quantize some (wbits, abits)"
            )

    # the calibration loss ---------------------------------------------------------------------
    @torch.no_grad()
    def _targets(self) -> list[Tensor]:
        """Labels (real data) or the teacher's log-probabilities (synthetic), per batch."""
        if self.calib.labels is not None:
            labels = self.calib.labels.to(self.device)
            return list(labels.split(self.config.batch_size))
        return [F.log_softmax(self.teacher(x).float(), dim=1) for x in self.batches]

    @torch.no_grad()
    def loss(self) -> float:
        """Mean calibration loss of the student as it stands."""
        total, count = 0.0, 0
        for index, (x, target) in enumerate(zip(self.batches, self.targets, strict=True)):
            logits = self._forward(index, x).float()
            if self.calib.labels is not None:
                batch = F.cross_entropy(logits, target, reduction="sum")
            else:
                log_q = F.log_softmax(logits, dim=1)
                batch = (target.exp() * (target - log_q)).sum()
            total += float(batch)
            count += len(x)
        self._dirty_from = len(self._chain or ())
        self.evaluations += 1
        return total / count

    def _forward(self, index: int, x: Tensor) -> Tensor:
        """The student's output on batch ``index``, recomputed only from the first part of the
        chain a clip changed since the last evaluation (the rest is cached)."""
        if self._chain is None:
            return self.student(x)
        inputs = self._cache[index]
        if not inputs:
            inputs.extend([x] + [None] * len(self._chain))
        h = inputs[self._dirty_from]
        for k in range(self._dirty_from, len(self._chain)):
            inputs[k] = h
            h = self._chain[k](h)
        inputs[len(self._chain)] = h
        return h

    def _setup_cache(self) -> None:
        """Split the student into a chain of parts run one after the other, when its forward
        is exactly that (checked on a batch), so a clip change reruns only the parts after it.
        Off when the activations to keep would pass ``CACHE_BYTES``."""
        self._cache: list[list[Any]] = [[] for _ in self.batches]
        self._chain = sequential_chain(self.student, self.batches[0])
        self._dirty_from = 0
        self._part_of: dict[int, int] = {}
        if self._chain is None:
            log.info("LAPQ: the student is not a plain chain of modules; no activation cache")
            return
        for k, part in enumerate(self._chain):
            for module in part.modules():
                self._part_of[id(module)] = k
        if self._cache_bytes() > CACHE_BYTES:
            log.info("LAPQ: activation cache would exceed %d bytes; off", CACHE_BYTES)
            self._chain = None

    @torch.no_grad()
    def _cache_bytes(self) -> int:
        sizes = []
        handles = [
            part.register_forward_pre_hook(lambda m, a: sizes.append(a[0].numel()))
            for part in self._chain
        ]
        try:
            with full_precision(self.student):
                self.student(self.batches[0][:1])
        finally:
            for handle in handles:
                handle.remove()
        images = sum(len(x) for x in self.batches)
        return sum(sizes) * images * 4

    # what to clip -----------------------------------------------------------------------------
    def _clip_targets(self) -> list[_Clip]:
        clips = []
        gen = torch.Generator().manual_seed(0)
        for name, layer in quant_layers(self.student):
            if layer.wbits is not None:
                w = _subsample(layer.weight.detach().flatten(), self.config.max_samples, gen)
                clips.append(_Clip(name, "weight", layer.wbits, layer, w, float(w.abs().max())))
        for name, samples in self._activation_samples(gen).items():
            aq = dict(act_quantizers(self.student))[name]
            kind = "unsigned" if float(samples.min()) >= 0 else "signed"
            top = float(samples.max() if kind == "unsigned" else samples.abs().max())
            clips.append(_Clip(name, kind, aq.bits, aq, samples, top))
        return clips

    @torch.no_grad()
    def _activation_samples(self, gen: torch.Generator) -> dict[str, Tensor]:
        """A seeded random subset of each quantized activation, from the full-precision model."""
        quantizers = [(n, aq) for n, aq in act_quantizers(self.student) if aq.bits is not None]
        total = sum(len(x) for x in self.batches)
        kept: dict[str, list[Tensor]] = {name: [] for name, _ in quantizers}
        current = {"share": 0.0}

        def hook(name: str):
            def record(module: nn.Module, args: tuple[Any, ...]) -> None:
                flat = args[0].detach().float().flatten()
                k = min(len(flat), math.ceil(self.config.max_samples * current["share"]))
                index = torch.randperm(len(flat), generator=gen)[:k].to(flat.device)
                kept[name].append(flat[index].cpu())

            return record

        handles = [aq.register_forward_pre_hook(hook(name)) for name, aq in quantizers]
        try:
            with full_precision(self.student):
                for x in tqdm(self.batches, desc="lapq activations", disable=not self.progress):
                    current["share"] = len(x) / total
                    self.student(x)
        finally:
            for handle in handles:
                handle.remove()
        return {name: torch.cat(chunks) for name, chunks in kept.items()}

    # setting clips ----------------------------------------------------------------------------
    def set_clips(self, values: np.ndarray | list[float]) -> None:
        for i, (clip, value) in enumerate(zip(self.clips, values, strict=True)):
            alpha = max(float(value), 1e-8)
            if self._current[i] == alpha:
                continue
            self._current[i] = alpha
            if self._chain is not None:
                self._dirty_from = min(self._dirty_from, self._part_of[id(clip.module)])
            if clip.kind == "weight":
                clip.module.set_weight_range(-alpha, alpha)
                if self.config.bias_correction:
                    bias_correct(clip.module)
            else:
                clip.module.set_range(0.0 if clip.kind == "unsigned" else -alpha, alpha)

    def layerwise(self, p: float) -> np.ndarray:
        values = []
        for clip in self.clips:
            values.append(lp_optimal_clip(clip.samples.to(self.device), clip.bits, p, clip.kind))
        return np.asarray(values)

    # the phases ---------------------------------------------------------------------------------
    def run(self) -> tuple[nn.Module, dict[str, Any]]:
        cfg = self.config
        report: dict[str, Any] = {"config": cfg.to_dict(), "clipped_tensors": len(self.clips)}
        started = time.perf_counter()
        clips = self.layerwise(cfg.lw_p)
        self.set_clips(clips)
        report["loss_layerwise"] = self.loss()
        report["p"] = cfg.lw_p
        self.seconds["layer_wise"] = _since(started)
        if cfg.stages != "lw":
            clips = self._quadratic_p(report)
        if cfg.stages == "lw+qa+powell":
            clips = self._powell(clips, report)
        self.set_clips(clips)
        report["loss_final"] = self.loss()
        report["clips"] = {c.name: float(v) for c, v in zip(self.clips, clips, strict=True)}
        report["loss_evaluations"] = self.evaluations
        report["seconds"] = self.seconds
        return self.student, report

    def _quadratic_p(self, report: dict[str, Any]) -> np.ndarray:
        started = time.perf_counter()
        grid = list(self.config.p_grid)
        losses = []
        for p in tqdm(grid, desc="lapq p grid", disable=not self.progress):
            self.set_clips(self.layerwise(p))
            losses.append(self.loss())
        p_star = quadratic_minimum(grid, losses)
        clips = self.layerwise(p_star)
        self.set_clips(clips)
        report.update(p_grid=grid, p_grid_losses=losses, p=p_star, loss_quadratic=self.loss())
        self.seconds["p_search"] = _since(started)
        return clips

    def _powell(self, start: np.ndarray, report: dict[str, Any]) -> np.ndarray:
        """Powell over all clips, in units of the starting clips; never worse than the start."""
        started = time.perf_counter()
        cfg = self.config
        bounds = [
            (1e-2, max(1.0, c.top / max(s, 1e-12))) for c, s in zip(self.clips, start, strict=True)
        ]
        self.set_clips(start)
        best = {"loss": self.loss(), "u": np.ones(len(start))}
        start_loss = best["loss"]
        bar = tqdm(desc="lapq powell", unit="eval", disable=not self.progress)

        def objective(u: np.ndarray) -> float:
            self.set_clips(u * start)
            value = self.loss()
            if value < best["loss"]:
                best.update(loss=value, u=u.copy())
            bar.update(1)
            bar.set_postfix(loss=f"{best['loss']:.4f}")
            return value

        try:
            options: dict[str, Any] = {"maxiter": cfg.maxiter, "xtol": cfg.xtol, "ftol": 1e-4}
            if cfg.maxfev is not None:
                options["maxfev"] = cfg.maxfev
            result = minimize(
                objective, np.ones(len(start)), method="Powell", bounds=bounds, options=options
            )
        finally:
            bar.close()
        report.update(
            loss_powell_start=start_loss,
            loss_powell=best["loss"],
            powell_evaluations=int(result.nfev),
        )
        self.seconds["powell"] = _since(started)
        return best["u"] * start


def lapq_quantize(
    teacher: nn.Module,
    spec: QuantSpec,
    calib: CalibrationSet,
    config: LapqConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """A LAPQ student of ``teacher`` and the report of its phases (losses, p, clips, seconds)."""
    return Lapq(teacher, spec, calib, config, device=device, progress=progress).run()


# --- helpers ---------------------------------------------------------------------------------
def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def _subsample(x: Tensor, limit: int, gen: torch.Generator) -> Tensor:
    if len(x) <= limit:
        return x
    return x[torch.randperm(len(x), generator=gen)[:limit].to(x.device)]


@torch.no_grad()
def sequential_chain(model: nn.Module, x: Tensor) -> list[nn.Module] | None:
    """``model``'s parts in the order its forward runs them, when that forward is exactly the
    chain: nn.Sequential containers are opened (their forward is a chain by definition); the
    top level's children in registration order are accepted only if running them one after
    the other reproduces ``model(x)`` bit for bit (checked with quantization off). None when
    not."""
    parts = _open_sequentials(model) if isinstance(model, nn.Sequential) else None
    if parts is None:
        parts = [p for child in model.children() for p in _open_sequentials(child)]
    if not parts:
        return None
    with full_precision(model):
        expected = model(x)
        h = x
        try:
            for part in parts:
                h = part(h)
        except (RuntimeError, TypeError, ValueError):  # e.g. a shape mismatch: not a chain
            return None
    if not isinstance(h, Tensor) or h.shape != expected.shape or not torch.equal(h, expected):
        return None
    return parts


def _open_sequentials(module: nn.Module) -> list[nn.Module]:
    if type(module) is nn.Sequential:
        return [p for child in module.children() for p in _open_sequentials(child)]
    return [module]


@contextlib.contextmanager
def full_precision(model: nn.Module) -> Iterator[None]:
    """Every weight and activation quantizer of ``model`` off inside the block."""
    layers = [(layer, layer.wbits) for _, layer in quant_layers(model)]
    acts = [(aq, aq.bits) for _, aq in act_quantizers(model)]
    try:
        for layer, _ in layers:
            layer.wbits = None
        for aq, _ in acts:
            aq.bits = None
        yield
    finally:
        for layer, bits in layers:
            layer.wbits = bits
        for aq, bits in acts:
            aq.bits = bits
