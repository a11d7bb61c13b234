"""Synthetic-sample sources: where a zero-shot method's training images come from.

``build_source(name, teacher, num_classes=..., image_shape=...)`` is the one entry point; methods
register a factory under a name with ``register_source``. ``check_source_options`` checks the
options' names and values (a source class's ``OPTIONS``) without a teacher, before any work.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from zsq.errors import ZsqError
from zsq.models.introspect import has, require
from zsq.options import read_options
from zsq.synth.arc import GENOTYPES, ArcGenerator, ArcSource, CellGenotype
from zsq.synth.base import SampleSource, SynthBatch, freeze_teacher
from zsq.synth.bns import BatchNormStatsLoss, batch_mean_var
from zsq.synth.gdfq import (
    ConditionalBatchNorm2d,
    GdfqGenerator,
    GdfqSource,
    build_gdfq_generator,
)
from zsq.synth.genie import GenieGenerator, GenieSource, distill_genie
from zsq.synth.mimiq import MimiqSource
from zsq.synth.noise import GaussianSource
from zsq.synth.psaq import AttentionPoolSource, PsaqSource
from zsq.synth.qimera import QimeraSource
from zsq.synth.vit_losses import (
    head_alignment_loss,
    mean_interhead_similarity,
    patch_similarity_entropy,
    total_variation,
)
from zsq.synth.zeroq import ZeroQOptions, ZeroQSource, distill_images

SourceFactory = Callable[..., SampleSource]

_SOURCES: dict[str, SourceFactory] = {}


def register_source(name: str, factory: SourceFactory, *, overwrite: bool = False) -> None:
    """Make ``factory(teacher, *, num_classes, image_shape, **kwargs)`` buildable by name."""
    key = name.strip().lower()
    if key in _SOURCES and not overwrite and _SOURCES[key] is not factory:
        raise ValueError(f"sample source {key!r} is already registered")
    _SOURCES[key] = factory


def available_sources() -> list[str]:
    return sorted(_SOURCES)


def build_source(
    name: str,
    teacher: nn.Module,
    *,
    num_classes: int,
    image_shape: Sequence[int],
    checked: bool = False,
    **kwargs: Any,
) -> SampleSource:
    """The sample source registered as ``name``, built for ``teacher`` (``checked``: the options
    and the teacher's fit were checked already, as a run checks its config before any work)."""
    if not checked:
        check_source_options(name, kwargs)
        require_fit(name, teacher)
    factory = _SOURCES[name.strip().lower()]
    return factory(teacher, num_classes=num_classes, image_shape=image_shape, **kwargs)


def source_class(name: str) -> SourceFactory:
    """The class (factory) registered as ``name``."""
    return _SOURCES[name.strip().lower()]


def source_needs(name: str) -> str | None:
    """What the source ``name`` needs of a teacher: 'batchnorm', 'attention' or None."""
    return getattr(_SOURCES[name.strip().lower()], "needs", None)


def require_fit(name: str, teacher: nn.Module, what: str | None = None) -> None:
    """A one-line error when the source ``name`` cannot draw from ``teacher`` (a BatchNorm source
    on a model without BatchNorm, an attention source on a CNN), naming the sources that can;
    ``what`` says who needs it (default: 'sample source NAME')."""
    need = source_needs(name)
    if has(teacher, need):
        return
    fits = [s for s in available_sources() if has(teacher, source_needs(s))]
    kind = "CNNs" if need == "attention" else "models without BatchNorm"
    require(
        teacher,
        need,
        what or f"sample source {name}",
        f"sources that work for {kind}: " + ", ".join(fits),
    )


def check_source_options(name: str, options: dict[str, Any], hidden: tuple[str, ...] = ()) -> None:
    """One-line errors for an unknown source, a misspelt option (naming those that exist, but
    the ``hidden`` ones the caller sets itself) or a value its rule refuses; needs no teacher,
    so a run can check before any work."""
    key = name.strip().lower()
    if key not in _SOURCES:
        raise ZsqError(
            f"unknown sample source {name!r}; choose one of: {', '.join(available_sources())}"
        )
    factory = _SOURCES[key]
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    internal = ("self", "teacher", "num_classes", "image_shape", *hidden)
    accepted = [n for n in params if n not in internal]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ZsqError(
            f"sample source {key!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'no options'}"
        )
    rules = getattr(factory, "OPTIONS", {})
    read_options(f"{key} source", rules, options)


register_source("gdfq", GdfqSource)
register_source("gaussian", GaussianSource)
register_source("qimera", QimeraSource)
register_source("arc", ArcSource)
register_source("zeroq", ZeroQSource)
register_source("psaq", PsaqSource)
register_source("mimiq", MimiqSource)
register_source("genie", GenieSource)

__all__ = [
    "ArcGenerator",
    "ArcSource",
    "AttentionPoolSource",
    "BatchNormStatsLoss",
    "CellGenotype",
    "ConditionalBatchNorm2d",
    "GENOTYPES",
    "GaussianSource",
    "GdfqGenerator",
    "GdfqSource",
    "GenieGenerator",
    "GenieSource",
    "MimiqSource",
    "PsaqSource",
    "QimeraSource",
    "SampleSource",
    "SynthBatch",
    "ZeroQOptions",
    "ZeroQSource",
    "available_sources",
    "batch_mean_var",
    "build_gdfq_generator",
    "build_source",
    "check_source_options",
    "distill_genie",
    "distill_images",
    "freeze_teacher",
    "head_alignment_loss",
    "mean_interhead_similarity",
    "patch_similarity_entropy",
    "register_source",
    "require_fit",
    "source_class",
    "source_needs",
    "total_variation",
]
