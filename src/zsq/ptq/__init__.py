"""Post-training quantization: min/max calibration, ZeroQ's calibration data, LAPQ."""

from zsq.ptq.calibration import (
    CalibrationSet,
    real_calibration,
    synthetic_calibration,
)
from zsq.ptq.lapq import LapqConfig, lapq_quantize
from zsq.ptq.minmax import calibrate_activations, gaussian_batches, minmax_quantize

__all__ = [
    "CalibrationSet",
    "LapqConfig",
    "calibrate_activations",
    "gaussian_batches",
    "lapq_quantize",
    "minmax_quantize",
    "real_calibration",
    "synthetic_calibration",
]
