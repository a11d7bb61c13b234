"""Calibration images for the post-training methods: synthetic (data-free) or real.

``--calib`` names either a registered sample source (``gaussian``, ``zeroq``, ``gdfq``,
``qimera``, ``arc``: synthetic, no labels, so a loss compares the student with the teacher) or a
dataset spec (real training images with labels: the method is then not zero-shot, and every
report says so).

A trainable source (a generator) is first trained alone against the teacher for ``train_steps``
steps (its own CE + BNS loss, the generator warm-up of GDFQ), then sampled. The images are kept
in the run directory (``calibration.safetensors``), so a resumed run does not make them again;
the source option ``cache=FILE`` also keeps them in FILE, and a later run with the same source
options and teacher (any bit width, any method) loads them from there instead of making them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from zsq.errors import ConfigError, ZsqError
from zsq.options import python_path, read_options, whole_number
from zsq.synth import build_source, check_source_options, source_class
from zsq.synth.cache import load_images, remove_batches, save_images

log = logging.getLogger(__name__)

CALIB_FILE = "calibration.safetensors"
TRAIN_STEPS = 200  # generator steps before sampling (a trainable --calib source)
TRAIN_BATCH = 32


@dataclass
class CalibrationSet:
    """Calibration images in the teacher's input space (CPU), with labels only for real data."""

    images: Tensor
    labels: Tensor | None
    description: str
    real: bool
    report: dict[str, Any] = field(default_factory=dict)

    def batches(self, batch_size: int, device: torch.device | str) -> Iterator[Tensor]:
        for start in range(0, len(self.images), batch_size):
            yield self.images[start : start + batch_size].to(device)


def real_calibration(dataset: Dataset, size: int, seed: int, spec: str) -> CalibrationSet:
    """``size`` labelled images drawn (seeded) from a real training set."""
    from zsq.data import subset

    chosen = subset(dataset, min(size, len(dataset)), seed=seed)
    images, labels = [], []
    for x, y in DataLoader(chosen, batch_size=256, shuffle=False):
        images.append(x)
        labels.append(torch.as_tensor(y))
    text = f"REAL DATA: {len(chosen)} training images of {spec} (not zero-shot)"
    return CalibrationSet(torch.cat(images), torch.cat(labels), text, real=True)


def synthetic_calibration(
    name: str,
    teacher: nn.Module,
    *,
    size: int,
    num_classes: int,
    image_shape: Sequence[int],
    source_options: dict[str, Any] | None = None,
    work_dir: Path | None = None,
    progress: bool = True,
    checked: bool = False,
    batches: Path | None = None,
    on_batch_saved: Callable[[], None] | None = None,
) -> CalibrationSet:
    """``size`` images from the sample source ``name`` (trained first when it is a generator),
    loaded from ``work_dir`` when an earlier session of the run made them. ``batches``: where a
    source that makes its pool batch by batch keeps the batches made so far (and continues from
    them); ``on_batch_saved`` runs after each save."""
    options = dict(source_options or {})
    shared = Path(options.pop("cache")) if "cache" in options else None
    train_steps = int(options.pop("train_steps", TRAIN_STEPS))
    train_batch = int(options.pop("train_batch", TRAIN_BATCH))
    key = {
        "source": name,
        "size": size,
        "image_shape": list(image_shape),
        "options": dict(options),
        "train_steps": train_steps,
        "train_batch": train_batch,
    }
    # the run's own copy keeps the random state after the images: a resumed run that loads it
    # goes on exactly as the unbroken run (a shared cache is another run's and keeps none)
    cache = work_dir / CALIB_FILE if work_dir is not None else None
    for path in (cache, shared):
        if path is None:
            continue
        cached = load_images(path, key, teacher, restore_rng=path == cache)
        if cached is not None:
            images, report = cached
            log.info("%d calibration images loaded from %s", len(images), path)
            if cache is not None and path != cache:
                save_images(cache, images, key, teacher, report, with_rng=True)
            return CalibrationSet(images, None, _describe(name, size), real=False, report=report)
    if source_class(name).pooled:  # a pool of the calibration size
        options.setdefault("num_images", size)
        options.setdefault("progress", progress)
    source = build_source(
        name, teacher, num_classes=num_classes, image_shape=image_shape, checked=checked, **options
    )
    if batches is not None and source.batched:
        source.keep_batches(batches, on_batch_saved)
    try:
        report = _train(source, train_steps, train_batch, progress) if source.trainable else {}
        images = _draw(source, size)
        report.update(getattr(source, "report", {}) or {})
    finally:
        source.close()
    # one layout, made or loaded (a 1-channel channels-last batch counts as contiguous, yet the
    # convolutions take another path on it): a resumed run calibrates exactly as the first
    images = images.detach().cpu().clone(memory_format=torch.contiguous_format)
    for path in (cache, shared):
        if path is not None:
            save_images(path, images, key, teacher, report, with_rng=path == cache)
    if batches is not None:
        remove_batches(batches)
    return CalibrationSet(images, None, _describe(name, size), real=False, report=report)


CALIBRATION_RULES = {  # options of the calibration procedure itself, not of the source
    "cache": python_path(),
    "train_steps": whole_number(0, TRAIN_STEPS),
    "train_batch": whole_number(1, TRAIN_BATCH),
}


def check_calibration_options(
    name: str, options: dict[str, Any], size_field: str = "calib_size"
) -> None:
    """One-line errors for the options of calibration images from source ``name``: the
    procedure's own (``cache``, ``train_steps``, ``train_batch``), then the source's. The
    source options the procedure sets itself are refused: the image count (the caller's
    ``size_field``) and progress (the run's)."""
    owners = {"num_images": f"«{size_field}»", "progress": "the run's progress setting"}
    for key, owner in owners.items():
        if key in options:
            raise ConfigError(f"calibration option {key} is set by {owner}; drop it")
    read_options("calibration", CALIBRATION_RULES, options)
    source_options = {k: v for k, v in options.items() if k not in CALIBRATION_RULES}
    check_source_options(name, source_options, hidden=tuple(owners))


def _describe(name: str, size: int) -> str:
    return f"{name}, {size} synthetic images (data-free)"


def _train(source: nn.Module, steps: int, batch: int, progress: bool) -> dict[str, Any]:
    """Train a generator alone against the teacher (no student exists yet)."""
    if steps < 0:
        raise ZsqError(f"train_steps must be >= 0, got {steps}")
    terms: dict[str, Tensor] = {}
    for _ in tqdm(range(steps), desc="calibration generator", disable=not progress):
        _, terms = source.step(batch)
    return {"train_steps": steps, "final_loss": {k: float(v) for k, v in terms.items()}}


@torch.no_grad()
def _draw(source: Any, size: int, batch: int = 256) -> Tensor:
    if hasattr(source, "images"):  # a fixed pool (ZeroQ): all of it, in order
        return source.images()[:size]
    chunks = [source.sample(min(batch, size - start)).images for start in range(0, size, batch)]
    return torch.cat(chunks)
