"""``minmax``: the post-training baseline. Weights take per-channel min/max ranges (the paper's
Eq. 2-4); activation ranges are the running min/max over the calibration images, Gaussian noise
by default (data-free)."""

from __future__ import annotations

from dataclasses import dataclass

from zsq.methods.base import Context, MethodHandler, Outcome, register_method
from zsq.methods.calibration import (
    CALIB_BATCH,
    Calibrated,
    calibration_images,
    calibration_report,
)
from zsq.ptq import minmax_quantize


@dataclass(frozen=True)
class MinMax(Calibrated):
    """Min/max ranges on ``calib`` (default ``gaussian``: noise in the teacher's input space)."""


class MinMaxHandler(MethodHandler):
    def run(self, config: MinMax, ctx: Context) -> Outcome:
        images = calibration_images(config, ctx)
        batches = images.batches(CALIB_BATCH, ctx.device)
        student = minmax_quantize(
            ctx.teacher, ctx.quant, batches, device=ctx.device, image_shape=ctx.image_shape
        )
        return Outcome(student, calibration_report(images))


register_method(
    "minmax",
    MinMax,
    MinMaxHandler(),
    summary="min/max ranges on calibration images (Gaussian noise by default); seconds",
    family="post-training",
)
