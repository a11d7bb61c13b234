"""``zeroq``: min/max ranges on ZeroQ's images, distilled from the teacher's BatchNorm
statistics (data-free). The same arithmetic as ``minmax``; only the calibration images differ,
and they are always ZeroQ's own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zsq.errors import ConfigError
from zsq.methods.base import register_method
from zsq.methods.minmax import MinMax, MinMaxHandler


@dataclass(frozen=True)
class ZeroQ(MinMax):
    """Min/max ranges on ``calib_size`` ZeroQ images (``calib_options``: zeroq's, e.g.
    ``steps``, ``cache=FILE``)."""

    calib: Any = "zeroq"

    def __post_init__(self) -> None:
        if not (isinstance(self.calib, str) and self.calib.strip().lower() == "zeroq"):
            shown = self.calib if isinstance(self.calib, str) else "a Dataset"
            raise ConfigError(
                f"«method» zeroq calibrates on its own distilled images; drop «calib», or use "
                f"«method» minmax or lapq with «calib» {shown}",
            )
        super().__post_init__()

    def sample_sources(self) -> list[tuple[str, str]]:
        return [("zeroq", "«method» zeroq")]


register_method(
    "zeroq",
    ZeroQ,
    MinMaxHandler(),
    summary="min/max ranges on ZeroQ images distilled from BatchNorm statistics; minutes",
    family="post-training",
)
