"""``gdfq``: the student distilled on samples of GDFQ's conditional generator, trained against
the teacher's BatchNorm statistics and its class predictions (Xu et al., ECCV 2020); with
``ait=True``, AIT's KL-only loss and gradient inundation (Choi et al., CVPR 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from zsq.methods.base import register_method
from zsq.methods.distillation import Distillation, DistillationHandler


@dataclass(frozen=True)
class GDFQ(Distillation):
    """GDFQ's generator (``source_options``: its ``latent_dim``, ``lr``, ``betas``, ...)."""

    SOURCE = "gdfq"


register_method(
    "gdfq",
    GDFQ,
    DistillationHandler(),
    summary="distillation on GDFQ's BatchNorm-matching generator (CNNs with BatchNorm)",
    family="distillation",
)
