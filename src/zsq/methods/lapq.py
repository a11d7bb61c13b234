"""``lapq``: loss-aware post-training quantization (Nahshan et al.) on calibration images,
ZeroQ's by default (data-free); on real labelled images a data-driven baseline. Its student can
also start a distillation (``init``): each layer's deployed weights become the student's float
weights and LAPQ's activation clips the starting ranges of its observers."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zsq.errors import ConfigError
from zsq.io import write_json
from zsq.methods.base import Context, MethodHandler, Outcome, register_method
from zsq.methods.calibration import Calibrated, calibration_images, calibration_report
from zsq.ptq.lapq import LapqConfig, lapq_quantize, lapq_spec
from zsq.quant import QuantSpec, act_quantizers, quant_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LAPQ(Calibrated, LapqConfig):
    """LAPQ's options (:class:`~zsq.ptq.lapq.LapqConfig`: ``layers``, ``stages``, ``p_grid``,
    ``maxfev``, ...) on ``calib`` (default ``zeroq``)."""

    calib: Any = "zeroq"

    def __post_init__(self) -> None:
        LapqConfig.__post_init__(self)
        self._check_calibration()

    @classmethod
    def smoke(cls) -> LAPQ:
        return cls(calib_size=8, calib_options={"steps": 2}, stages="lw", max_samples=1000)


class LapqHandler(MethodHandler):
    can_start = True
    learns_quantization = True

    def run(self, config: LAPQ, ctx: Context) -> Outcome:
        student, images, lapq = _lapq(config, ctx)
        return Outcome(student, {**calibration_report(images), "lapq": lapq})

    def check_allocation(self, config: LAPQ) -> None:
        if config.layers == "paper":
            raise ConfigError(
                "LAPQ «layers» 'paper' keeps three layers in full precision, which a bit "
                "allocation counts as quantized; use «layers» 'all' with a «budget»",
            )

    def start(self, config: LAPQ, ctx: Context, student: nn.Module) -> dict[str, Any]:
        start, images, lapq = _lapq(config, ctx)
        carry_over(start, student)
        log.info("student initialised from LAPQ (calibration loss %.4f)", lapq["loss_final"])
        record = {"calibration": images.description, "real_data": images.real, "lapq": lapq}
        record = json.loads(json.dumps(record))
        if ctx.layout is not None:
            write_json(ctx.layout.init_report("lapq"), record)
        return record

    def student_spec(self, report: dict[str, Any], spec: QuantSpec, model: nn.Module) -> QuantSpec:
        return lapq_spec(spec, model, report["lapq"]["config"]["layers"])


def _lapq(config: LAPQ, ctx: Context) -> tuple[nn.Module, Any, dict[str, Any]]:
    """LAPQ's student on the config's calibration images (kept in the run folder for a resume)."""
    images = calibration_images(config, ctx)
    student, lapq = lapq_quantize(
        ctx.teacher, ctx.quant, images, config, device=ctx.device, progress=ctx.progress
    )
    return student, images, lapq


@torch.no_grad()
def carry_over(lapq_student: nn.Module, student: nn.Module) -> None:
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


register_method(
    "lapq",
    LAPQ,
    LapqHandler(),
    summary="loss-aware clipping (LAPQ) on calibration images (ZeroQ's by default); minutes",
    family="post-training",
)
