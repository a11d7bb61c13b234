"""Student distillation: gradient inundation, the trainer loop with checkpoints (the losses are
:mod:`zsq.numerics.losses`)."""

from zsq.distill.inundation import (
    CrossingMeter,
    GradientInundation,
    InundationStats,
    code_change_fraction,
    layer_codes,
    search_kappa,
)
from zsq.distill.trainer import Distiller, build_optimizer

__all__ = [
    "CrossingMeter",
    "Distiller",
    "GradientInundation",
    "InundationStats",
    "build_optimizer",
    "code_change_fraction",
    "layer_codes",
    "search_kappa",
]
