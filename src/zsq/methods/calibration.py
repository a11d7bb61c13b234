"""The calibration images of a post-training method (and of a distillation's ``init``): a sample
source (synthetic, data-free) or a real dataset (a data-driven baseline, reported as such).

One config base, :class:`Calibrated`, holds the three fields every calibrating method shares and
their checks; :func:`calibration_images` makes the images once per run, keeping synthetic ones
in the run folder so that an interrupted run does not make them again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

from zsq.data.datasets import spec_kinds
from zsq.errors import ConfigError
from zsq.io import write_verified
from zsq.methods.base import Context, MethodConfig, dataset_label
from zsq.ptq import CalibrationSet, gaussian_batches, real_calibration, synthetic_calibration
from zsq.ptq.calibration import check_calibration_options
from zsq.synth import available_sources

CALIB_SIZE = 512  # calibration images unless calib_size says otherwise
CALIB_BATCH = 128  # images per calibration forward
NOISE = "gaussian"  # the source that needs no teacher and keeps nothing


def is_source(calib: Any) -> bool:
    """Whether ``calib`` names a sample source (else it is a dataset spec or a Dataset)."""
    return isinstance(calib, str) and calib.strip().lower() in available_sources()


@dataclass(frozen=True)
class Calibrated(MethodConfig):
    """A method that calibrates on images: ``calib`` is a sample source (``gaussian``,
    ``zeroq``, ``gdfq``, ...: data-free), a dataset spec (``cifar10-jpeg:DIR``) or a labelled
    ``Dataset`` of real training images (not zero-shot: the report says so); ``calib_size``
    images of it; ``calib_options`` configure a synthetic source (e.g. zeroq's ``steps``,
    ``cache=FILE``; a generator's ``train_steps``)."""

    calib: str | Dataset = NOISE
    calib_size: int = CALIB_SIZE
    calib_options: Mapping[str, Any] = field(default_factory=dict)

    REFUSAL: ClassVar[str] = (
        "it is a post-training method (it calibrates, it does not distil): drop {it}, or use a "
        "method that takes {it}"
    )

    def __post_init__(self) -> None:
        self._check_calibration()

    @classmethod
    def smoke(cls):
        made = is_source(cls.calib) and cls.calib != NOISE
        return cls(calib_size=8, calib_options={"steps": 2} if made else {})

    def _check_calibration(self) -> None:
        size = self.calib_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"«calib_size» must be a positive whole number, got {size!r}")
        if not isinstance(self.calib_options, Mapping):
            raise ConfigError(
                "«calib_options» must be a dict of option -> value, got "
                f"{self.calib_options!r:.60}",
            )
        calib = self.calib
        if isinstance(calib, str):
            calib = calib.strip()
            object.__setattr__(self, "calib", calib.lower() if is_source(calib) else calib)
            _check_calib_name(self.calib)
        elif not isinstance(calib, Dataset):
            raise ConfigError(
                f"«calib» must be a sample source name, a dataset spec or a labelled Dataset, got "
                f"{type(calib).__name__} {calib!r:.60}",
            )
        made = is_source(self.calib) and self.calib != NOISE
        if self.calib_options and not made:
            raise ConfigError(
                f"«calib_options» has no effect with «calib» {self.calib_text} (they configure a "
                "synthetic calibration source such as zeroq or gdfq); drop them",
            )
        if made:
            check_calibration_options(self.calib, dict(self.calib_options))

    @property
    def calib_text(self) -> str:
        """``calib`` as reports name it."""
        return self.calib if isinstance(self.calib, str) else dataset_label(self.calib)

    @property
    def real_data(self) -> bool:
        return not is_source(self.calib)

    def sample_sources(self) -> list[tuple[str, str]]:
        if is_source(self.calib) and self.calib != NOISE:
            return [(self.calib, f"«calib» {self.calib}")]
        return []

    def datasets(self) -> list[tuple[str, str]]:
        if isinstance(self.calib, str) and not is_source(self.calib):
            return [(self.calib, "calib")]
        return []


def _check_calib_name(calib: str) -> None:
    """A name that is neither a source nor a dataset spec (a misspelt source, most likely) is
    refused with both lists, before the teacher is loaded."""
    kind = calib.partition(":")[0].strip().lower()
    if is_source(calib) or kind in spec_kinds():
        return
    raise ConfigError(
        f"«calib» {calib!r:.60} is neither a sample source ({', '.join(available_sources())}) "
        f"nor a dataset spec (KIND:PATH with KIND one of {', '.join(spec_kinds())})"
    )


def calibration_images(config: Calibrated, ctx: Context) -> CalibrationSet:
    """The run's calibration images: real ones from the config's dataset, else made by its
    source (kept in the run folder, which is marked resumable, so a resumed run reuses them)."""
    calib, size = config.calib, config.calib_size
    if isinstance(calib, Dataset):
        return real_calibration(calib, size, ctx.seed, config.calib_text)
    if not is_source(calib):
        return real_calibration(ctx.dataset(calib), size, ctx.seed, calib)
    folder = ctx.layout.folder if ctx.layout is not None else None
    resumable = ctx.layout is not None and calib != NOISE
    batches = ctx.layout.image_batches if resumable else None
    made = source_images(calib, ctx, size, config.calib_options, folder, batches)
    if resumable:
        mark_resumable(ctx)
    return made


def source_images(
    source: str,
    ctx: Context,
    size: int,
    options: Mapping[str, Any] | None = None,
    folder: Path | None = None,
    batches: Path | None = None,
) -> CalibrationSet:
    """``size`` images from the sample source ``source`` for ``ctx``'s teacher, kept in
    ``folder`` (and loaded from there when an earlier session made them); ``batches``: where a
    pool made batch by batch keeps its batches so far, the run marked resumable after each."""
    if source == NOISE:  # seeded on its own generator: the baseline's numbers stay fixed
        batches = gaussian_batches(size, ctx.image_shape, CALIB_BATCH, seed=ctx.seed)
        text = f"gaussian noise, {size} samples (data-free)"
        return CalibrationSet(torch.cat(list(batches)), None, text, real=False)
    return synthetic_calibration(
        source,
        ctx.teacher,
        size=size,
        num_classes=ctx.num_classes,
        image_shape=ctx.image_shape,
        source_options=dict(options or {}),
        work_dir=folder,
        progress=ctx.progress,
        checked=True,  # by the config that names the source
        batches=batches,
        on_batch_saved=(lambda: mark_resumable(ctx)) if batches is not None else None,
    )


def mark_resumable(ctx: Context) -> None:
    """A checkpoint marks the run as resumable: what it made so far (its calibration images, a
    distillation's start) is kept if it stops. A checkpoint the method wrote already (e.g. after
    a reconstructed unit) stays as it is."""
    path = ctx.layout.checkpoint
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"calibration": ctx.layout.CALIBRATION}
    write_verified(path, json.dumps(record).encode())


def calibration_report(images: CalibrationSet) -> dict[str, Any]:
    """What a report says about the calibration images."""
    report: dict[str, Any] = {
        "calibration": images.description,
        "real_data": images.real,
        "calibration_images": len(images.images),
    }
    if images.report:
        report["calibration_report"] = images.report
    return report
