"""``qimera``: distillation on Qimera's boundary-supporting samples, drawn from superposed class
embeddings with soft labels (Choi et al., NeurIPS 2021)."""

from __future__ import annotations

from dataclasses import dataclass

from zsq.methods.base import register_method
from zsq.methods.distillation import Distillation, DistillationHandler


@dataclass(frozen=True)
class Qimera(Distillation):
    """Qimera's generator (``source_options``: ``mix_prob``, ``num_mix``, ``init_from_teacher``,
    ``noise_scale``, ``disentangle``, ``distinct_classes``)."""

    SOURCE = "qimera"


register_method(
    "qimera",
    Qimera,
    DistillationHandler(),
    summary="distillation on Qimera's superposed-embedding samples (CNNs with BatchNorm)",
    family="distillation",
)
