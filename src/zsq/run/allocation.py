"""Mixed precision inside a run: per-layer widths chosen under a budget (or reused) before the
method runs; the method then quantizes with them as per-layer overrides."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from zsq.errors import ConfigError
from zsq.layout import RunLayout
from zsq.methods.base import Context, MethodConfig, method_of
from zsq.methods.calibration import source_images
from zsq.mixed.allocate import (
    Allocation,
    MixedConfig,
    allocate,
    check_feasible,
    check_reuse,
    read_bits,
    write_bits,
)
from zsq.quant import QuantSpec


def check_budget(
    mixed: MixedConfig,
    method: MethodConfig,
    teacher: nn.Module,
    image_shape: tuple[int, int, int],
    quant: QuantSpec,
) -> None:
    """Before anything is written: the method can take per-layer widths; a reused allocation
    fits the teacher; a budget is achievable at the narrowest widths (else one line naming the
    smallest achievable cost)."""
    if quant.overrides:
        raise ConfigError(
            "per-layer overrides and a bit allocation («budget», «bits_from») both set layer "
            "widths; drop «quant overrides|quant.overrides» (the allocation chooses every layer's "
            "width)",
        )
    for config in (method, getattr(method, "init", None)):
        if config is not None:
            method_of(config).handler.check_allocation(config)
    if mixed.bits_from is not None:
        check_reuse(read_bits(mixed.bits_from), teacher, image_shape, quant)
    else:
        check_feasible(teacher, image_shape, mixed, quant)


def run_allocation(mixed: MixedConfig, ctx: Context, layout: RunLayout | None) -> Allocation:
    """The run's allocation: kept from an earlier session, reused (``bits_from``) or made now on
    synthetic images from the configured source, and written to ``bits.json``."""
    kept = layout.bits if layout is not None else None
    if kept is not None and kept.is_file():
        return read_bits(kept)
    if mixed.bits_from is not None:
        reused = read_bits(mixed.bits_from)
        allocation = check_reuse(reused, ctx.teacher, ctx.image_shape, ctx.quant)
    else:
        folder: Path | None = None
        if layout is not None:
            folder = layout.allocation_dir
            folder.mkdir(exist_ok=True)
        images = source_images(mixed.source, ctx, mixed.samples, mixed.source_options, folder)
        allocation = allocate(
            ctx.teacher,
            image_shape=ctx.image_shape,
            budget=mixed.budget,
            allocator=mixed.allocator,
            choices=mixed.choices,
            spec=ctx.quant,
            images=images.images.to(ctx.device),
            samples=images.description,
            penalty=1.0 if mixed.penalty is None else mixed.penalty,
            search_steps=mixed.steps,
            probes=mixed.probes,
            seed=ctx.seed,
            progress=ctx.progress,
            act_choices=mixed.act_choices,
        )
    if kept is not None:
        write_bits(allocation, kept)
    return allocation
