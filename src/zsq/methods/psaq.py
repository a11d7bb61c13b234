"""``psaq``: distillation of a vision transformer on PSAQ-ViT's images, synthesised from the
teacher's patch similarity (Li et al., ECCV 2022), with the output KL only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from zsq.layout import RunLayout
from zsq.methods.base import register_method
from zsq.methods.distillation import SMOKE_SCHEDULE, Distillation, DistillationHandler


@dataclass(frozen=True)
class PSAQ(Distillation):
    """PSAQ-ViT's image pool (``source_options``: ``num_images``, ``steps``, ``cache``, ...)."""

    SOURCE = "psaq"
    RECIPE_CHANGES: ClassVar[dict[str, Any]] = {"loss": "kl"}

    @classmethod
    def smoke(cls):
        pool = {"num_images": 4, "batch_size": 2, "steps": 2}
        return cls(recipe="demo", overrides=SMOKE_SCHEDULE, source_options=pool)

    def source_defaults(self, layout: RunLayout | None, progress: bool) -> dict[str, Any]:
        """The pool is kept in the run folder (a resumed run does not synthesise it again) and
        shows progress as the run does."""
        return {"progress": progress, **({"cache": layout.pool} if layout is not None else {})}


register_method(
    "psaq",
    PSAQ,
    DistillationHandler(),
    summary="distillation on PSAQ-ViT's patch-similarity images (vision transformers)",
    family="distillation",
)
