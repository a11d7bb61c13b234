"""``arc``: distillation on AutoReCon's searched generator (Zhu et al., 2021), the genotypes of
the official code."""

from __future__ import annotations

from dataclasses import dataclass

from zsq.methods.base import register_method
from zsq.methods.distillation import Distillation, DistillationHandler


@dataclass(frozen=True)
class ARC(Distillation):
    """ARC's generator (``source_options``: ``genotype``, default by class count and size)."""

    SOURCE = "arc"


register_method(
    "arc",
    ARC,
    DistillationHandler(),
    summary="distillation on AutoReCon's searched generator (CNNs with BatchNorm)",
    family="distillation",
)
