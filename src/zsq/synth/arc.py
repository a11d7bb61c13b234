"""ARC (AutoReCon): GDFQ's training with an AutoGAN-style cell generator.

ARC searches the generator's architecture; we do no search. ``ArcGenerator`` builds the search
space's shape with ONE FIXED genotype per input size, hand-picked to look like AutoGAN/ARC cells.
It is not the paper's searched result (which the reference code does not state as plain data).

Generator: z (default 120) is split into three parts. Part 1 goes through a Linear layer to
``width x s x s`` (s = ceil(H / 8)); each of the three cells upsamples x2 (nearest or bilinear),
adds its latent part mapped by a Linear layer to a one-channel map on the cell's grid, and runs a
small DAG over nodes n0 (upsampled input), n1 and n2 (output)::

    n1 = op01(n0) + sum(conv1x1(upsample(cell_j output)) for j in skips_from)
    n2 = op12(n1) + op02(n0)

Each conv op is pre-activation: class-conditional BN -> ReLU -> conv (kernel 1/3/5, dilation 1
or 2); ``skip`` is the identity. Output: class-conditional BN -> LeakyReLU(0.2) -> conv3x3 to the
image channels -> Tanh -> centre crop -> BN(affine=False). The conditional BN before the output
activation follows "class-conditional BN everywhere" (the last cell ends in an unnormalised sum).

Genotypes (``GENOTYPES``):

* ``cifar`` (inputs below 128 px): 3x3 convs on the main edges, one dilated 3x3 in cell 2 and a
  5x5 in cell 3 for context, a 1x1 shortcut in cell 1 and identity shortcuts after, nearest /
  bilinear / nearest upsampling, and a skip from cell 1 into cell 3.
* ``imagenet`` (128 px and up): the wide kernels (5x5, dilated 5x5, dilated 3x3) sit in the
  low-resolution cells 1-2, where they widen the receptive field cheaply; cell 3 runs at full
  resolution with two 3x3 convs to keep the cost near GDFQ's ImageNet generator.

Sides that are not a multiple of 8 (28 for MNIST-like inputs) are generated at the next multiple
of 8 and centre-cropped, before the final BN: cropping keeps the pixels unresampled (no
interpolation blur) and the BN then normalises exactly the pixels the teacher sees.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsq.errors import ZsqError
from zsq.synth.base import check_image_shape, check_num_classes
from zsq.synth.gdfq import IMAGENET_MIN_SIZE, ConditionalBatchNorm2d, GdfqSource

log = logging.getLogger(__name__)

# op name -> (kernel size, dilation); "skip" is the identity.
OPS: dict[str, tuple[int, int] | None] = {
    "skip": None,
    "conv1x1": (1, 1),
    "conv3x3": (3, 1),
    "conv5x5": (5, 1),
    "dil_conv3x3": (3, 2),
    "dil_conv5x5": (5, 2),
}
UPSAMPLE_MODES = ("nearest", "bilinear")


@dataclass(frozen=True)
class CellGenotype:
    """One cell: upsampling mode, ops on edges (n0->n1, n1->n2, n0->n2), cells skipped in."""

    up: str
    ops: tuple[str, str, str]
    skips_from: tuple[int, ...] = ()


GENOTYPES: dict[str, tuple[CellGenotype, ...]] = {
    "cifar": (
        CellGenotype("nearest", ("conv3x3", "conv3x3", "conv1x1")),
        CellGenotype("bilinear", ("conv3x3", "dil_conv3x3", "skip")),
        CellGenotype("nearest", ("conv5x5", "conv3x3", "skip"), skips_from=(0,)),
    ),
    "imagenet": (
        CellGenotype("nearest", ("conv5x5", "dil_conv5x5", "conv1x1")),
        CellGenotype("bilinear", ("dil_conv3x3", "conv3x3", "skip")),
        CellGenotype("nearest", ("conv3x3", "conv3x3", "skip"), skips_from=(0,)),
    ),
}


def resolve_genotype(
    image_shape: Sequence[int], genotype: str | Sequence[CellGenotype] = "auto"
) -> tuple[CellGenotype, ...]:
    """A named genotype ('auto' picks 'imagenet' from a 128 px side on) or a custom one, checked."""
    if isinstance(genotype, str):
        name = genotype
        if name == "auto":
            _, height, width = check_image_shape(image_shape)
            name = "imagenet" if max(height, width) >= IMAGENET_MIN_SIZE else "cifar"
        if name not in GENOTYPES:
            raise ZsqError(
                f"unknown ARC genotype {genotype!r}; use 'auto', {', '.join(map(repr, GENOTYPES))}"
                " or a sequence of CellGenotype"
            )
        return GENOTYPES[name]
    cells = tuple(genotype)
    _check_cells(cells)
    return cells


def _check_cells(cells: tuple[CellGenotype, ...]) -> None:
    if not cells:
        raise ZsqError("an ARC genotype needs at least one cell")
    for index, cell in enumerate(cells):
        if cell.up not in UPSAMPLE_MODES:
            raise ZsqError(f"cell {index}: upsampling {cell.up!r} is not one of {UPSAMPLE_MODES}")
        bad = [op for op in cell.ops if op not in OPS]
        if len(cell.ops) != 3 or bad:
            raise ZsqError(
                f"cell {index}: ops must be 3 names from {sorted(OPS)}, got {cell.ops!r}"
            )
        if any(not 0 <= j < index for j in cell.skips_from):
            raise ZsqError(
                f"cell {index}: skips_from {cell.skips_from!r} must name earlier cells "
                f"(0..{index - 1})"
            )


class CellOp(nn.Module):
    """Pre-activation op: class-conditional BN -> ReLU -> conv (or the identity for 'skip')."""

    def __init__(self, name: str, channels: int, num_classes: int) -> None:
        super().__init__()
        self.name = name
        spec = OPS[name]
        self.norm = ConditionalBatchNorm2d(channels, num_classes) if spec else None
        self.conv = None
        if spec is not None:
            kernel, dilation = spec
            pad = dilation * (kernel - 1) // 2
            self.conv = nn.Conv2d(channels, channels, kernel, padding=pad, dilation=dilation)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        if self.conv is None:
            return x
        return self.conv(F.relu(self.norm(x, cond)))

    def extra_repr(self) -> str:
        return self.name


class ArcCell(nn.Module):
    """Upsample x2, add the latent map, then the n0 -> n1 -> n2 DAG (see module doc)."""

    def __init__(
        self,
        gene: CellGenotype,
        channels: int,
        num_classes: int,
        latent_part: int,
        grid: tuple[int, int],
    ) -> None:
        super().__init__()
        self.gene = gene
        self.grid = grid
        self.inject = nn.Linear(latent_part, grid[0] * grid[1])
        self.op01, self.op12, self.op02 = (CellOp(n, channels, num_classes) for n in gene.ops)
        self.skip_ops = nn.ModuleList(
            CellOp("conv1x1", channels, num_classes) for _ in gene.skips_from
        )

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        align = False if self.gene.up == "bilinear" else None
        return F.interpolate(x, size=size, mode=self.gene.up, align_corners=align)

    def forward(self, x: Tensor, z: Tensor, cond: Tensor, earlier: Sequence[Tensor]) -> Tensor:
        n0 = self._resize(x, self.grid)
        n0 = n0 + self.inject(z).view(z.shape[0], 1, *self.grid)
        n1 = self.op01(n0, cond)
        for op, source in zip(self.skip_ops, self.gene.skips_from, strict=True):
            n1 = n1 + op(self._resize(earlier[source], self.grid), cond)
        return self.op12(n1, cond) + self.op02(n0, cond)


class ArcGenerator(nn.Module):
    """AutoGAN-style cell generator with class-conditional BN, called as ``generator(z, cond)``.

    ``cond`` is hard labels (B,) or class weights (B, num_classes); z is (B, latent_dim), split
    into one part per cell (near-equal sizes). See the module doc for the layout and genotypes.
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        *,
        latent_dim: int = 120,
        width: int = 64,
        genotype: str | Sequence[CellGenotype] = "auto",
    ) -> None:
        super().__init__()
        channels, height, width_px = check_image_shape(image_shape)
        self.num_classes = check_num_classes(num_classes)
        self.genotype = resolve_genotype(image_shape, genotype)
        cells = len(self.genotype)
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < cells:
            raise ZsqError(
                f"latent_dim must be an int >= {cells} (one part per cell), got {latent_dim!r}"
            )
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ZsqError(f"width must be a positive int, got {width!r}")
        self.latent_dim = latent_dim
        self.width = width
        self.image_shape = (channels, height, width_px)
        factor = 2**cells
        self.init_hw = (-(-height // factor), -(-width_px // factor))  # ceil: crop at the end
        self.parts = [latent_dim // cells + (i < latent_dim % cells) for i in range(cells)]

        self.stem = nn.Linear(self.parts[0], width * self.init_hw[0] * self.init_hw[1])
        self.cells = nn.ModuleList(
            ArcCell(
                gene,
                width,
                num_classes,
                self.parts[i],
                (self.init_hw[0] * 2 ** (i + 1), self.init_hw[1] * 2 ** (i + 1)),
            )
            for i, gene in enumerate(self.genotype)
        )
        self.norm_out = ConditionalBatchNorm2d(width, num_classes)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: Tensor, cond: Tensor) -> Tensor:
        parts = torch.split(z, self.parts, dim=1)
        x = self.stem(parts[0]).view(z.shape[0], self.width, *self.init_hw)
        outputs: list[Tensor] = []
        for cell, part in zip(self.cells, parts, strict=True):
            x = cell(x, part, cond, outputs)
            outputs.append(x)
        x = F.leaky_relu(self.norm_out(x, cond), 0.2)
        x = torch.tanh(self.conv_out(x))
        return self.bn_out(center_crop(x, self.image_shape[1:]))


def center_crop(x: Tensor, size: Sequence[int]) -> Tensor:
    """The central ``size`` window of the last two dims (a no-op when they already match)."""
    height, width = size
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


class ArcSource(GdfqSource):
    """ARC as a sample source: GDFQ's step and loss (CE + ``bns_weight`` * BNS, Adam) on an
    ``ArcGenerator``. See ``GdfqSource`` for the training contract."""

    def __init__(
        self,
        teacher: nn.Module,
        *,
        num_classes: int,
        image_shape: Sequence[int],
        latent_dim: int = 120,
        width: int = 64,
        genotype: str | Sequence[CellGenotype] = "auto",
        bns_weight: float = 0.1,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
    ) -> None:
        generator = ArcGenerator(
            num_classes, image_shape, latent_dim=latent_dim, width=width, genotype=genotype
        )
        super().__init__(
            teacher,
            num_classes=num_classes,
            image_shape=image_shape,
            latent_dim=latent_dim,
            bns_weight=bns_weight,
            lr=lr,
            betas=betas,
            generator=generator,
        )
