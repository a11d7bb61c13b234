"""``genie``: block reconstruction on synthetic images (Genie, Jeon et al., CVPR 2023): Genie-D's
distilled images by default, then every unit of the student learns its rounding and step sizes
against the full-precision unit (AdaRound, LSQ, BRECQ's blocks, QDrop; :mod:`zsq.ptq.reconstruct`).
On real images (``calib`` a dataset) it is the data-driven ceiling, and reports say so. Its
student can start a distillation (``init``): the distillation then begins from the reconstructed
student exactly, its learned grids kept.

Conventions: ``paper`` (the reconstruction papers': the first and last layers' weights at 8
bits, the image unquantized, the inputs of the second and the last layer at 8 bits) or ``all``
(every layer at the run's widths, as the AIT line quantizes).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsq.errors import ConfigError
from zsq.io import read_verified, write_json, write_verified
from zsq.layout import is_resume_marker
from zsq.methods.base import Context, MethodHandler, Outcome, register_method
from zsq.methods.calibration import (
    Calibrated,
    calibration_images,
    calibration_report,
    mark_resumable,
)
from zsq.ptq.blocks import describe_blocks, find_blocks
from zsq.ptq.reconstruct import Reconstruction, ReconstructionConfig
from zsq.quant import QuantSpec, prepare_buffers, quantize_model
from zsq.quant.spec import exact_pattern
from zsq.runtime import rng_state, set_rng_state

log = logging.getLogger(__name__)

CONVENTIONS = ("paper", "all")
# presets: the reference's settings, and a CPU-sized one (ResNet-20 on 1,024 images in about
# 15 minutes on 2 cores; docs/results.md)
GENIE_RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"reconstruction": {}, "distill": {"iters": 4000}},
    # short: 80 Genie-D iterations per batch, 1,500 per unit; measured in docs/results.md §12
    "short": {"reconstruction": {"iters": 1500}, "distill": {"iters": 80}},
}
DEFAULT_RECIPE = "paper"


@dataclass(frozen=True)
class Genie(Calibrated):
    """Genie-D images (``calib="genie"``, 1,024 of them) reconstructed block by block.

    ``recipe``: ``paper`` (4,000 distillation iterations per batch, 20,000 reconstruction
    iterations per unit) or ``short`` (CPU-sized); ``overrides``: fields of
    :class:`~zsq.ptq.reconstruct.ReconstructionConfig` (``iters``, ``drop_prob``, ...);
    ``calib_options``: the image source's (Genie-D's ``iters``, ``batch_size``, ... over the
    recipe's); ``convention``: ``paper`` or ``all``; ``blocks``: class names of a model's own
    blocks to reconstruct as units (the known ones are found by themselves).
    """

    calib: Any = "genie"
    calib_size: int = 1024
    recipe: str = DEFAULT_RECIPE
    overrides: Mapping[str, Any] = field(default_factory=dict)
    convention: str = "paper"
    blocks: tuple[str, ...] = ()
    reconstruction: ReconstructionConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, str) or self.recipe not in GENIE_RECIPES:
            raise ConfigError(
                f"unknown «recipe» {self.recipe!r:.60} for method genie; use one of "
                f"{', '.join(GENIE_RECIPES)}"
            )
        if not isinstance(self.convention, str) or self.convention not in CONVENTIONS:
            raise ConfigError(
                f"«convention» must be one of {', '.join(CONVENTIONS)}, got {self.convention!r:.60}"
            )
        if not isinstance(self.blocks, (list, tuple)) or not all(
            isinstance(b, str) for b in self.blocks
        ):
            raise ConfigError(f"«blocks» must be a list of class names, got {self.blocks!r:.60}")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        self._check_calibration()  # before the recipe's Genie-D options are merged into them
        object.__setattr__(self, "reconstruction", self._resolve_reconstruction())
        if self.calib == "genie":  # the recipe's distillation, under the user's options
            options = {**GENIE_RECIPES[self.recipe]["distill"], **self.calib_options}
            object.__setattr__(self, "calib_options", options)
        batch = self.reconstruction.batch_size
        if self.calib_size < batch:  # no whole batch to reconstruct on
            raise ConfigError(
                f"«calib_size» {self.calib_size} is fewer images than the reconstruction's batch "
                f"of {batch}; raise «calib_size» or lower batch_size in «overrides»"
            )

    def _resolve_reconstruction(self) -> ReconstructionConfig:
        """The recipe's reconstruction settings under the user's ``overrides``."""
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(
                "«overrides» must be a dict of reconstruction field -> value, got "
                f"{self.overrides!r:.60}"
            )
        fields = list(ReconstructionConfig().to_dict())
        unknown = sorted(set(self.overrides) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown reconstruction field(s) in «overrides»: {', '.join(unknown)}; the "
                f"fields are {', '.join(fields)}"
            )
        return ReconstructionConfig(
            **{**GENIE_RECIPES[self.recipe]["reconstruction"], **self.overrides}
        )

    @classmethod
    def smoke(cls) -> Genie:
        return cls(
            recipe="short",
            calib_size=8,
            calib_options={"iters": 2, "batch_size": 4},
            overrides={"iters": 4, "batch_size": 4},
        )

    def record(self) -> dict[str, Any]:
        record = super().record()
        record.pop("overrides")
        return {**record, "reconstruction": self.reconstruction.to_dict()}


class GenieHandler(MethodHandler):
    can_start = True
    learns_quantization = True

    def run(self, config: Genie, ctx: Context) -> Outcome:
        spec = genie_spec(config, ctx.quant, ctx.teacher)
        student = quantize_model(ctx.teacher, spec, ctx.image_shape).to(ctx.device)
        checkpoint = ctx.layout.checkpoint if ctx.layout is not None else None
        report = self._reconstruct(config, ctx, student, checkpoint)
        return Outcome(student, report, quant=spec)

    def spec(self, config: Genie, spec: QuantSpec, model: nn.Module) -> QuantSpec:
        return genie_spec(config, spec, model)

    def start(self, config: Genie, ctx: Context, student: nn.Module) -> dict[str, Any]:
        # checkpointed unit by unit beside the distillation's checkpoint: a run stopped before
        # the distillation's first epoch goes on with the next unit
        checkpoint = ctx.layout.init_checkpoint("genie") if ctx.layout is not None else None
        report = self._reconstruct(config, ctx, student, checkpoint)
        if ctx.layout is not None:
            write_json(ctx.layout.init_report("genie"), report)
        return report

    def check(self, config: Genie, ctx: Context) -> None:
        find_blocks(ctx.teacher, config.blocks)  # a class the model lacks: refused before work

    def check_allocation(self, config: Genie) -> None:
        if config.convention == "paper":
            raise ConfigError(
                "«convention» 'paper' keeps the first and last layers at 8 bits, which a bit "
                "allocation would choose itself; use «convention» 'all' with a «budget»"
            )

    def _reconstruct(
        self, config: Genie, ctx: Context, student: nn.Module, checkpoint: Path | None
    ) -> dict[str, Any]:
        """Reconstruct ``student`` in place on the config's calibration images, saving a
        ``checkpoint`` after every unit (when given); a resumed run continues from it."""
        if config.recipe == DEFAULT_RECIPE and ctx.progress:
            log.info("genie with recipe paper: the reference's settings (hours on a CPU; "
                     "recipe short: minutes)")  # fmt: skip
        images = calibration_images(config, ctx)
        work = Reconstruction(
            ctx.teacher, student, images.images, config.reconstruction, blocks=config.blocks,
            device=ctx.device, progress=ctx.progress,
        )  # fmt: skip
        done, records = 0, []
        if checkpoint is not None and ctx.resume and checkpoint.exists():
            done, records = _resume(checkpoint, student)
        on_unit = None
        if checkpoint is not None:

            def on_unit(index: int, record: dict[str, Any]) -> None:
                records.append(record)
                _save(checkpoint, student, index + 1, records)
                mark_resumable(ctx)  # (real calibration images leave no marker of their own)

        ran = work.run(done, on_unit)
        records = records if on_unit is not None else [*records, *ran]
        return {
            **calibration_report(images),
            "genie": {
                "recipe": config.recipe,
                "convention": config.convention,
                "reconstruction": config.reconstruction.to_dict(),
                "units": describe_blocks(find_blocks(student, config.blocks)),
                "blocks": records,
                "mean_loss_before": _mean(records, "loss_before"),
                "mean_loss_after": _mean(records, "loss_after"),
            },
        }


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
    return sum(r[key] for r in records) / len(records) if records else None


def _save(path: Any, student: nn.Module, done: int, records: list[dict[str, Any]]) -> None:
    """The student after ``done`` units, the records and the random state: a resume continues
    with the next unit exactly."""
    state = {
        "genie_units_done": done,
        "student": student.state_dict(),
        "records": json.dumps(records),
        "rng": rng_state(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_verified(path, buffer.getvalue())


def _resume(path: Any, student: nn.Module) -> tuple[int, list[dict[str, Any]]]:
    payload = read_verified(path)
    if is_resume_marker(payload):  # only the images were kept: no unit was done yet
        return 0, []
    unreadable = ConfigError(
        f"cannot resume from {path}: it is not a reconstruction checkpoint of this run's "
        "student (damaged, or written by other code); start the run again with «overwrite=True»"
    )
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception:  # torch's unpickler raises many types for a damaged payload
        raise unreadable from None
    if not isinstance(state, dict) or "genie_units_done" not in state:
        return 0, []  # the images were kept, no unit was done yet
    try:
        prepare_buffers(student, state["student"])
        student.load_state_dict(state["student"])
        set_rng_state(state["rng"])
    except Exception:  # another model's tensors, a missing entry
        raise unreadable from None
    log.info("resumed the reconstruction after %d units", state["genie_units_done"])
    return int(state["genie_units_done"]), json.loads(state["records"])


def genie_spec(config: Genie, spec: QuantSpec, model: nn.Module) -> QuantSpec:
    """``spec`` under the config's convention: ``paper`` sets the first and last layers'
    weights to 8 bits and the activations the reconstruction papers keep at 8 bits (the image
    unquantized); the run's own per-layer overrides still win."""
    if config.convention == "all":
        return spec
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if len(layers) < 2:
        return spec
    first, second, last = layers[0], layers[1], layers[-1]
    overrides: dict[str, dict[str, Any]] = {
        exact_pattern(first): {"wbits": 8},
        exact_pattern(last): {"wbits": 8},
    }
    if spec.act_placement != "reference":  # inputs quantized at the layers (some, under auto)
        overrides[exact_pattern(first)]["abits"] = None
        overrides[exact_pattern(second)] = {"abits": 8}
        overrides[exact_pattern(last)]["abits"] = 8
    if spec.act_placement != "input":  # and after ReLU modules: the first and the last at 8 bits
        relus = [n for n, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
        for name in (relus[:1] + relus[-1:]) if relus else []:
            overrides[exact_pattern(name)] = {"abits": 8}
    return replace(spec, overrides={**overrides, **spec.overrides})


register_method(
    "genie",
    Genie,
    GenieHandler(),
    summary="block reconstruction (AdaRound, LSQ, BRECQ blocks, QDrop) on Genie's distilled "
    "images; recipe short: minutes on a CPU",
    family="post-training",
)

__all__ = ["CONVENTIONS", "GENIE_RECIPES", "Genie", "GenieHandler", "genie_spec"]
