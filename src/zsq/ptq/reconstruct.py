"""Block reconstruction (BRECQ, QDrop, Genie-M): each unit of the student learns its weights'
rounding and its quantizers' step sizes so that its output matches the full-precision unit's on
the calibration images, one unit after the other.

Per unit, as the Genie reference (SamsungLabs/Genie, ``reconstruct.py``, ``quantizer.py``)
does it, read as facts:

- the inputs are cached first: the full-precision unit's input ``x`` and output ``y`` (teacher)
  and the student's input ``x_q`` (through the units already reconstructed), in the order of the
  calibration images;
- weights keep a per-output-channel grid from the clipping search minimising the 2.4-norm error
  (:func:`~zsq.ptq.rounding.lp_grid`); each weight's rounding is learned (AdaRound: the floor at
  the initial step plus a rectified sigmoid of a learned variable, hard at the end), and the
  step too; an activation quantizer's step is learned (LSQ), initialised by the same search on
  the first batch through it, on a symmetric grid (unsigned when that batch has no negative
  value);
- 20,000 iterations of batch 32 (a permutation of the images, again and again): the unit's
  input is ``x_q`` or ``x`` elementwise with probability 1/2 each, and every quantizer inside
  passes its input unquantized with probability 1/2 (QDrop; ``drop_prob=0`` is BRECQ: always
  quantized); the loss is the squared error summed over channels, averaged over the rest, plus
  after the first 20% of the iterations the rounding regulariser with its exponent annealed
  linearly from 20 to 2; Adam at 1e-4 (weight steps) and 4e-5 (activation steps) under cosine
  annealing, Adam at 1e-3 on the rounding variables.

Units are found by :func:`~zsq.ptq.blocks.find_blocks`. Quantizers outside every unit (an
activation between two units under the reference placement) are initialised the same way on the
first batch that reaches them and stay there. Everything cached lives on the CPU and goes to the
device a batch at a time. After a unit, its rounding and steps are folded into the student's own
quantizers (:meth:`set_weight_grid`, :meth:`ActQuantizer.set_grid`): the student computes with
zsq's arithmetic from then on, and exports its codes as they are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from zsq.errors import ZsqError
from zsq.options import number, read_options, whole_number
from zsq.ptq.blocks import find_blocks
from zsq.ptq.rounding import (
    beta_at,
    inverse_rectified_sigmoid,
    keep_mask,
    learned_step_quantize,
    lp_grid,
    rectified_sigmoid,
    rounding_regularizer,
)
from zsq.quant import act_quantizers, quant_layers
from zsq.quant.modules import ActQuantizer
from zsq.quant.quantizer import code_range, dequantize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconstructionConfig:
    """How each unit is reconstructed (the Genie reference's settings by default)."""

    iters: int = 20000
    batch_size: int = 32
    lr_weight_step: float = 1e-4
    lr_act_step: float = 4e-5
    lr_rounding: float = 1e-3
    round_weight: float = 1.0
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    drop_prob: float = 0.5

    def __post_init__(self) -> None:
        read_options("reconstruction", RECONSTRUCTION_RULES, asdict(self))
        if self.beta_end > self.beta_start:
            raise ZsqError(
                f"reconstruction option beta_end={self.beta_end} is above beta_start="
                f"{self.beta_start}; the rounding regulariser's exponent anneals down (the "
                "reference's 20 -> 2): lower beta_end or raise beta_start"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RECONSTRUCTION_RULES = {
    "iters": whole_number(0, 20000),
    "batch_size": whole_number(1, 32),
    "lr_weight_step": number(">= 0", lambda v: v >= 0, 1e-4),
    "lr_act_step": number(">= 0", lambda v: v >= 0, 4e-5),
    "lr_rounding": number(">= 0", lambda v: v >= 0, 1e-3),
    "round_weight": number(">= 0", lambda v: v >= 0, 1.0),
    "warmup": number("in [0, 1)", lambda v: 0 <= v < 1, 0.2),
    "beta_start": number("> 0", lambda v: v > 0, 20.0),
    "beta_end": number("> 0", lambda v: v > 0, 2.0),
    "drop_prob": number("in [0, 1]", lambda v: 0 <= v <= 1, 0.5),
}


# --- what a unit learns ---------------------------------------------------------------------------
class SoftRounding:
    """A layer's weights on a learned grid with learned rounding: ``(clamp(floor + h, qmin, qmax)
    + z) * step`` with ``h`` the rectified sigmoid of ``logits`` (``soft``) or ``logits >= 0``.
    Attached to the layer (``layer.weight_rounding``) while its unit is reconstructed."""

    def __init__(self, layer: nn.Module) -> None:
        weight = layer.weight.detach()
        per_channel = layer.w_channel_axis == 0
        step, zero_point = lp_grid(
            weight, layer.wbits, per_channel=per_channel, symmetric=layer.w_symmetric
        )
        self.bits = layer.wbits
        self.step = nn.Parameter(step)
        self.zero_point = zero_point
        scaled = weight / step - zero_point
        self.floor = torch.floor(scaled)
        self.logits = nn.Parameter(inverse_rectified_sigmoid(scaled - self.floor))
        self.soft = False

    def codes(self) -> Tensor:
        qmin, qmax = code_range(self.bits)
        h = rectified_sigmoid(self.logits) if self.soft else (self.logits >= 0).to(self.floor)
        return torch.clamp(self.floor + h, qmin, qmax)

    def __call__(self, weight: Tensor) -> Tensor:
        return (self.codes() + self.zero_point) * self.step

    def regularizer(self, beta: float) -> Tensor:
        return rounding_regularizer(rectified_sigmoid(self.logits), beta)

    @torch.no_grad()
    def fold(self, layer: nn.Module) -> None:
        """The hard codes as the layer's weights on its grid, exactly (scale = 1 / step)."""
        scale = 1 / self.step.detach()
        codes = self.codes().detach()
        layer.set_weight_grid(scale, self.zero_point)
        layer.weight.copy_(dequantize(codes, scale, self.zero_point))
        layer.weight_rounding = None


class LearnedStep:
    """An activation quantizer's learned step (LSQ) and QDrop: set up from the first batch it
    sees, then ``(clamp(round(x / step - z), qmin, qmax) + z) * step``, or with probability
    ``drop_prob`` the input itself while ``training``. Attached to the quantizer
    (``quantizer.learned``) until folded into its grid."""

    def __init__(self, bits: int, drop_prob: float) -> None:
        self.bits = bits
        self.drop_prob = drop_prob
        self.step: nn.Parameter | None = None
        self.zero_point: Tensor | None = None
        self.training = False

    def __call__(self, x: Tensor) -> Tensor:
        if self.step is None:
            signed = bool(x.detach().min() < 0)
            step, self.zero_point = lp_grid(
                x, self.bits, per_channel=False, symmetric=True, signed=signed
            )
            self.step = nn.Parameter(step)
        quantized = learned_step_quantize(x, self.step, self.zero_point, self.bits)
        if self.training and self.drop_prob > 0:  # lerp at 0/1 is exactly x or quantized
            return torch.lerp(x, quantized, keep_mask(x, 1 - self.drop_prob))
        return quantized

    @torch.no_grad()
    def fold(self, quantizer: ActQuantizer) -> None:
        quantizer.set_grid(1 / self.step.detach(), self.zero_point)
        quantizer.learned = None


# --- running through the units --------------------------------------------------------------------
class _Stop(Exception):
    """Ends a forward once the hooked unit has been seen."""


def _capture(model: nn.Module, unit: nn.Module, x: Tensor, output: bool) -> tuple[Tensor, ...]:
    """The unit's input (and output) on the batch ``x``, running ``model`` only that far."""
    seen: list[Tensor] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor | None = None) -> None:
        seen.extend([inputs[0].detach(), *([out.detach()] if output else [])])
        raise _Stop

    handle = unit.register_forward_hook(hook) if output else unit.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return tuple(seen)


@torch.no_grad()
def _cache(
    teacher: nn.Module,
    student: nn.Module,
    t_unit: nn.Module,
    s_unit: nn.Module,
    images: Tensor,
    batch: int,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """The unit's full-precision input and output and the student's input, on the CPU."""
    xs, ys, qs = [], [], []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch].to(device)
        x, y = _capture(teacher, t_unit, chunk, output=True)
        (xq,) = _capture(student, s_unit, chunk, output=False)
        xs.append(x.cpu())
        ys.append(y.cpu())
        qs.append(xq.cpu())
    return torch.cat(xs), torch.cat(ys), torch.cat(qs)


def mixed_inputs(x: Tensor, xq: Tensor, drop_prob: float) -> Tensor:
    """QDrop's input: each element the full-precision ``x`` with probability ``drop_prob``,
    else the student's ``xq`` (``drop_prob=0`` is BRECQ's: always ``xq``)."""
    if drop_prob == 0:
        return xq
    return torch.lerp(x, xq, keep_mask(x, 1 - drop_prob))


def reconstruction_error(output: Tensor, target: Tensor) -> Tensor:
    """The squared error summed over features (dim 1 of an NCHW or NC tensor, the last dim of a
    token sequence) and averaged over the rest, as the reference."""
    dim = -1 if output.dim() == 3 else 1
    difference = output - target
    return (difference * difference).sum(dim).mean()  # pow(2)'s backward is slower on a CPU


@torch.no_grad()
def _mean_error(unit: nn.Module, xq: Tensor, y: Tensor, batch: int, device: torch.device) -> float:
    total = 0.0
    for start in range(0, len(xq), batch):
        out = unit(xq[start : start + batch].to(device))
        total += float(reconstruction_error(out, y[start : start + batch].to(device))) * len(out)
    return total / len(xq)


@dataclass
class _Learners:
    """What one unit learns while it is reconstructed."""

    rounding: list[SoftRounding]
    steps: list[LearnedStep]

    def train(self, soft: bool) -> None:
        for r in self.rounding:
            r.soft = soft
        for s in self.steps:
            s.training = soft


class Reconstruction:
    """Reconstructs ``student`` (a zsq quantized copy of ``teacher``) unit by unit on
    ``images``; ``done`` units (from a checkpoint) are skipped. ``on_unit(index, record)`` is
    called after each unit, with the student folded up to it (a checkpoint can be written)."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        images: Tensor,
        config: ReconstructionConfig,
        *,
        blocks: Sequence[str] = (),
        device: torch.device,
        progress: bool = True,
    ) -> None:
        if len(images) < config.batch_size:  # it steps on whole batches only
            raise ZsqError(
                f"the reconstruction takes batches of {config.batch_size} images but has "
                f"{len(images)} calibration images; give at least {config.batch_size} or lower "
                "its batch_size"
            )
        self.teacher = teacher.eval()
        self.student = student.eval()
        self.images = images
        self.config = config
        self.device = device
        self.progress = progress
        self.units = find_blocks(student, blocks)
        self.teacher_modules = dict(teacher.named_modules())
        for p in [*teacher.parameters(), *student.parameters()]:
            p.requires_grad_(False)

    def run(self, done: int = 0, on_unit: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Reconstruct the units from ``done`` on; returns one record per unit run."""
        self._attach_steps()
        records = []
        for index in range(done, len(self.units)):
            record = self._unit(index)
            records.append(record)
            if on_unit is not None:
                on_unit(index, record)
        with torch.no_grad():  # quantizers after the last unit: set up on the first batch
            self.student(self.images[: self.config.batch_size].to(self.device))
        self._fold_orphans()
        return records

    def _attach_steps(self) -> None:
        """A learned step on every activation quantizer not yet on a grid (set up lazily)."""
        for _, quantizer in act_quantizers(self.student):
            if quantizer.bits is not None and not quantizer.has_grid and quantizer.learned is None:
                quantizer.learned = LearnedStep(quantizer.bits, self.config.drop_prob)
                quantizer.observing = False

    def _fold_orphans(self) -> None:
        """Quantizers outside every unit keep the step they were set up with."""
        for _, quantizer in act_quantizers(self.student):
            learned = quantizer.learned
            if learned is not None and learned.step is not None:
                learned.fold(quantizer)

    def _unit(self, index: int) -> dict[str, Any]:
        name, unit = self.units[index]
        started = time.perf_counter()
        cfg = self.config
        x, y, xq = _cache(
            self.teacher, self.student, self.teacher_modules[name], unit, self.images,
            cfg.batch_size, self.device,
        )  # fmt: skip
        self._fold_orphans()  # those before this unit were set up by the pass just made
        learners = self._learners(unit, xq[: cfg.batch_size].to(self.device))
        before = _mean_error(unit, xq, y, cfg.batch_size, self.device)
        self._optimise(unit, learners, x, y, xq, name)
        for _, layer in quant_layers(unit):
            if layer.weight_rounding is not None:
                layer.weight_rounding.fold(layer)
        for _, quantizer in act_quantizers(unit):
            if quantizer.learned is not None:
                quantizer.learned.fold(quantizer)
        after = _mean_error(unit, xq, y, cfg.batch_size, self.device)
        seconds = round(time.perf_counter() - started, 2)
        log.info("%s: reconstruction error %.4g -> %.4g (%.1f s)", name, before, after, seconds)
        return {"unit": name, "kind": type(unit).__name__, "loss_before": before,
                "loss_after": after, "seconds": seconds}  # fmt: skip

    @torch.no_grad()
    def _learners(self, unit: nn.Module, first: Tensor) -> _Learners:
        """Soft rounding on the unit's quantized weights; its activation steps set up from the
        first batch of its inputs (in order, as the reference's first batch)."""
        rounding = []
        for _, layer in quant_layers(unit):
            if layer.wbits is not None:
                layer.weight_rounding = SoftRounding(layer)
                rounding.append(layer.weight_rounding)
        unit(first)
        steps = [q.learned for _, q in act_quantizers(unit) if q.learned is not None]
        return _Learners(rounding, [s for s in steps if s.step is not None])

    def _optimise(
        self, unit: nn.Module, learners: _Learners, x: Tensor, y: Tensor, xq: Tensor, name: str
    ) -> None:
        cfg = self.config
        if cfg.iters == 0 or (not learners.rounding and not learners.steps):
            return
        groups = [
            {"params": [r.step for r in learners.rounding], "lr": cfg.lr_weight_step},
            {"params": [s.step for s in learners.steps], "lr": cfg.lr_act_step},
        ]
        scales = torch.optim.Adam([g for g in groups if g["params"]])
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(scales, T_max=cfg.iters)
        rounding = (
            torch.optim.Adam([r.logits for r in learners.rounding], lr=cfg.lr_rounding)
            if learners.rounding
            else None
        )
        learners.train(soft=True)
        bar = tqdm(
            total=cfg.iters, desc=f"reconstruct {name}", disable=not self.progress, leave=False
        )
        step = 0
        with torch.enable_grad():
            while step < cfg.iters:
                for index in torch.randperm(len(x)).split(cfg.batch_size):
                    if len(index) < cfg.batch_size:  # whole batches, as the reference
                        break
                    step += 1
                    loss, error = self._loss(unit, learners, x, y, xq, index, step)
                    scales.zero_grad()
                    if rounding is not None:
                        rounding.zero_grad()
                    loss.backward()
                    scales.step()
                    if rounding is not None:
                        rounding.step()
                    schedule.step()
                    bar.update(1)
                    if step % 100 == 0 or step == 1:
                        bar.set_postfix(error=f"{float(error):.4g}")
                    if step >= cfg.iters:
                        break
        bar.close()
        learners.train(soft=False)

    def _loss(
        self,
        unit: nn.Module,
        learners: _Learners,
        x: Tensor,
        y: Tensor,
        xq: Tensor,
        index: Tensor,
        step: int,
    ) -> tuple[Tensor, Tensor]:
        cfg = self.config
        inputs, target = x[index].to(self.device), y[index].to(self.device)
        mixed = mixed_inputs(inputs, xq[index].to(self.device), cfg.drop_prob)
        error = reconstruction_error(unit(mixed), target)
        loss = error
        if step >= cfg.warmup * cfg.iters and learners.rounding:
            beta = beta_at(step, cfg.iters, cfg.warmup, cfg.beta_start, cfg.beta_end)
            regularizer = sum(r.regularizer(beta) for r in learners.rounding)
            loss = loss + cfg.round_weight * regularizer
        return loss, error.detach()
