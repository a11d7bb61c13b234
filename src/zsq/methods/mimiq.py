"""``mimiq``: distillation of a vision transformer on MimiQ's images (heads' attention aligned
during synthesis), with the output KL and MimiQ's head-wise attention distillation (weight 10)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from zsq.methods.base import register_method
from zsq.methods.distillation import DistillationHandler
from zsq.methods.psaq import PSAQ


@dataclass(frozen=True)
class MimiQ(PSAQ):
    """MimiQ's image pool (``source_options`` as PSAQ's, plus its head-alignment weights)."""

    SOURCE = "mimiq"
    RECIPE_CHANGES: ClassVar[dict[str, Any]] = {"loss": "kl", "attn_distill": 10.0}


register_method(
    "mimiq",
    MimiQ,
    DistillationHandler(),
    summary="distillation on MimiQ's attention-aligned images, head-wise (vision transformers)",
    family="distillation",
)
