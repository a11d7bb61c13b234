"""Post-training quantization: min/max calibration (LAPQ comes later)."""

from zsq.ptq.minmax import calibrate_activations, gaussian_batches, minmax_quantize

__all__ = ["calibrate_activations", "gaussian_batches", "minmax_quantize"]
