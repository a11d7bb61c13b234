"""Student distillation: losses, gradient inundation, the trainer loop with checkpoints."""

from zsq.distill.inundation import (
    CrossingMeter,
    GradientInundation,
    InundationStats,
    code_change_fraction,
    layer_codes,
    search_kappa,
)
from zsq.distill.losses import kl_to_teacher, soft_cross_entropy
from zsq.distill.trainer import Distiller, build_optimizer

__all__ = [
    "CrossingMeter",
    "Distiller",
    "GradientInundation",
    "InundationStats",
    "build_optimizer",
    "code_change_fraction",
    "kl_to_teacher",
    "layer_codes",
    "search_kappa",
    "soft_cross_entropy",
]
