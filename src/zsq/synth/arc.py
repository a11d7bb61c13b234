"""ARC (AutoReCon): GDFQ's training with AutoReCon's searched cell generator.

We do no architecture search: ``GENOTYPES`` holds the genotypes the official AutoReCon code
ships as data (its ``generator_architecture.py``: one-hot rows, written here as names), and
``ArcGenerator`` builds the generator its ``model_generator.py`` defines from one of them.

Generator (reference sizes: ``width`` 64, ``latent_dim`` 100, 3 cells)::

    z = [z0 | z1 | z2]                       latent // 3, latent // 3, the rest (33, 33, 34)
    m_i = Linear(z_i) -> (width, b * 2**i)   one full-width map per cell, b = ceil(side / 8)
    x = m_0
    cell i (input x, previous cell's nodes p0, p1, p2; cell 0 has none):
        n0 = up_a(x), n1 = up_b(x)           x2 upsample (nearest | bilinear), CCBN, act, conv1x1
        n2 = op0(n0) + op1(n1) + link0(p0) + link1(p1) + link2(p2)
        n3 = op2(n0) + op3(n1) + op4(n2) + link3(p0) + link4(p1) + link5(p2)
        x = n3 + m_(i+1)                     (the next cell's input)
    image = BN(Tanh(conv3x3(act(CCBN(n3 of the last cell)))))   BN without affine

``act`` is LeakyReLU(0.2); CCBN is class-conditional BatchNorm with eps 0.8. An op is ``none``
(no contribution), ``skip`` (identity) or CCBN -> act -> conv (1x1, 3x3, 5x5, or dilation-2
3x3 / 5x5). A cross link upsamples a node of the previous cell x2 (nearest | bilinear) and runs
CCBN -> act -> conv1x1; a ``none`` link contributes nothing, but, as in the reference (whose
link computes and multiplies by 0), it still holds its CCBN and conv parameters. We skip its
computation: its output and gradients are zero either way (Adam leaves zero-gradient
parameters unchanged; its BN running statistics, which the reference updates, never reach the
image).

As in the reference, the CCBNs inside the cells are built for 1000 classes whatever the dataset
(extra rows are never looked up; soft conditions use the first ``num_classes`` rows), the output
CCBN for ``num_classes``: the parameter counts match the reference (tested).

Image sizes: the reference's bottom width is the image side / 8 (32 -> 4, 224 -> 28). We take
``ceil(side / 8)`` per side, generate at 8x that and centre-crop to the teacher's size before
the output BN (28 px Fashion-MNIST: 32 generated, 28 kept). A crop, not a resize: the kept
pixels are generated ones (no interpolation blur) and the output BN then normalises exactly the
pixels the teacher sees. The output conv makes ``image_shape[0]`` channels.

Genotype choice (``genotype="auto"``), like the reference's ``main.py`` picks by network:
images of 128 px and up take ``resnet18`` (the reference also has ``resnet50`` and
``mobilenetv2`` for those teachers: name them explicitly); smaller ones take ``cifar100`` from
100 classes on, else ``cifar10``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zsq.errors import ZsqError
from zsq.options import (
    Rule,
    read_options,
    whole_number,
)
from zsq.synth.base import (
    check_image_shape,
    check_num_classes,
)
from zsq.synth.gdfq import (
    GENERATOR_OPTIONS,
    IMAGENET_MIN_SIZE,
    ConditionalBatchNorm2d,
    GdfqSource,
)

log = logging.getLogger(__name__)

# Op name -> (kernel size, dilation); "none" contributes nothing, "skip" is the identity.
OPS: dict[str, tuple[int, int] | None] = {
    "none": None,
    "skip": None,
    "conv1x1": (1, 1),
    "conv3x3": (3, 1),
    "conv5x5": (5, 1),
    "dil_conv3x3": (3, 2),
    "dil_conv5x5": (5, 2),
}
UPSAMPLE_MODES = ("nearest", "bilinear")
LINK_MODES = ("none", *UPSAMPLE_MODES)  # "none": holds parameters, contributes nothing
OP_EDGES = ((0, 2), (1, 2), (0, 3), (1, 3), (2, 3))  # (from node, to node) of op0..op4
LINK_EDGES = ((0, 2), (1, 2), (2, 2), (0, 3), (1, 3), (2, 3))  # (previous cell's node, to node)
CELL_CBN_CLASSES = 1000  # the reference builds every in-cell CCBN for 1000 classes
BN_EPS = 0.8
LEAK = 0.2
DEFAULT_LATENT_DIM = 100
DEFAULT_WIDTH = 64


@dataclass(frozen=True)
class CellGenotype:
    """One cell: the two upsampling modes, the 5 ops (``OP_EDGES`` order) and the 6 cross
    links from the previous cell (``LINK_EDGES`` order; empty for the first cell)."""

    up: tuple[str, str]
    ops: tuple[str, str, str, str, str]
    links: tuple[str, ...] = ()


def _cells(up: Sequence[str], ops: Sequence[str], links: Sequence[str]) -> tuple[CellGenotype, ...]:
    """Three cells from the reference's flat rows: 6 upsamplings, 15 ops, 12 cross links."""
    return tuple(
        CellGenotype(
            tuple(up[2 * i : 2 * i + 2]),
            tuple(ops[5 * i : 5 * i + 5]),
            tuple(links[6 * (i - 1) : 6 * i]) if i else (),
        )
        for i in range(3)
    )


N, B = "nearest", "bilinear"
C1, C3, C5, D3, D5 = "conv1x1", "conv3x3", "conv5x5", "dil_conv3x3", "dil_conv5x5"

# The official searched genotypes (AutoReCon_AIT/generator_architecture.py: gen_cifar10,
# gen_cifar100, gen_resnet18, gen_resnet50, gen_mobilev2), decoded from their one-hot rows.
GENOTYPES: dict[str, tuple[CellGenotype, ...]] = {
    "cifar10": _cells(
        (N, N, N, N, B, N),
        (D5, "none", D5, D3, C5, D5, D5, C3, D3, D5, D5, D5, C1, C5, D3),
        ("none", "none", B, "none", "none", N, N, N, N, B, B, B),
    ),
    "cifar100": _cells(
        (B, N, N, N, N, N),
        (D5, D5, D5, "none", C5, D5, C5, C1, D3, D5, D5, D3, C5, C5, D5),
        ("none", B, N, "none", "none", N, "none", B, N, N, B, B),
    ),
    "resnet18": _cells(
        (B,) * 6,
        (D5, D5, D5, D5, D5, D5, D5, D5, D5, D3, D5, D5, C5, D3, D3),
        (N, B, N, B, B, N, B, B, N, N, B, N),
    ),
    "resnet50": _cells(
        (B,) * 6,
        (D5, D5, D5, D5, D5, D5, D5, C3, C1, C1, D3, D5, D5, C5, D3),
        (B, B, B, N, N, B, N, N, N, N, B, B),
    ),
    "mobilenetv2": _cells(
        (B, B, B, B, N, B),
        (D5, D5, C5, D5, D5, C5, D5, C1, C1, C1, C3, D5, C5, D5, D3),
        (B, B, N, B, B, B, B, N, B, B, B, N),
    ),
}
del N, B, C1, C3, C5, D3, D5


def default_genotype(num_classes: int, image_shape: Sequence[int]) -> str:
    """The genotype 'auto' picks (see the module doc)."""
    _, height, width = check_image_shape(image_shape)
    if max(height, width) >= IMAGENET_MIN_SIZE:
        return "resnet18"
    return "cifar100" if num_classes >= 100 else "cifar10"


def resolve_genotype(
    genotype: str | Sequence[CellGenotype], num_classes: int, image_shape: Sequence[int]
) -> tuple[str, tuple[CellGenotype, ...]]:
    """(name, cells) of a named genotype ('auto' included) or of a custom one, checked."""
    if not isinstance(genotype, str):
        cells = tuple(genotype)
        _check_cells(cells)
        return "custom", cells
    name = genotype.strip().lower()
    if name == "auto":
        name = default_genotype(num_classes, image_shape)
    if name not in GENOTYPES:
        raise ZsqError(
            f"unknown ARC genotype {genotype!r}; use 'auto', {', '.join(map(repr, GENOTYPES))}"
            " or a sequence of CellGenotype"
        )
    return name, GENOTYPES[name]


def _check_cells(cells: tuple[CellGenotype, ...]) -> None:
    if not cells:
        raise ZsqError("an ARC genotype needs at least one cell")
    for index, cell in enumerate(cells):
        if not isinstance(cell, CellGenotype):
            raise ZsqError(f"cell {index}: expected a CellGenotype, got {cell!r}")
        if len(cell.up) != 2 or any(mode not in UPSAMPLE_MODES for mode in cell.up):
            raise ZsqError(f"cell {index}: up must be 2 of {UPSAMPLE_MODES}, got {cell.up!r}")
        if len(cell.ops) != len(OP_EDGES) or any(op not in OPS for op in cell.ops):
            raise ZsqError(f"cell {index}: ops must be 5 of {tuple(OPS)}, got {cell.ops!r}")
        count = len(LINK_EDGES) if index else 0
        if len(cell.links) != count or any(mode not in LINK_MODES for mode in cell.links):
            raise ZsqError(
                f"cell {index}: links must be {count} of {LINK_MODES} (none for the first cell),"
                f" got {cell.links!r}"
            )


class CellConditionalBatchNorm2d(ConditionalBatchNorm2d):
    """Class-conditional BN whose tables may have more rows than classes (the reference's
    1000); a soft condition (B, k) mixes the first k rows."""

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        if cond.dim() == 1:
            return super().forward(x, cond)
        rows = cond.shape[1]
        gamma = cond.to(self.weight.weight.dtype) @ self.weight.weight[:rows]
        beta = cond.to(self.bias.weight.dtype) @ self.bias.weight[:rows]
        return self.bn(x) * gamma[:, :, None, None] + beta[:, :, None, None]


class NormActConv(nn.Module):
    """CCBN -> LeakyReLU(0.2) -> conv: the reference's op body (``kernel`` 1 in the up links)."""

    def __init__(self, channels: int, cbn_classes: int, kernel: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.norm = CellConditionalBatchNorm2d(channels, cbn_classes, eps=BN_EPS)
        pad = dilation * (kernel - 1) // 2
        self.conv = nn.Conv2d(channels, channels, kernel, padding=pad, dilation=dilation)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return self.conv(F.leaky_relu(self.norm(x, cond), LEAK))


class Upsample(NormActConv):
    """x2 upsampling (nearest or bilinear), then CCBN -> act -> conv1x1. ``mode='none'`` holds
    the same parameters but the owning cell never calls it (the reference multiplies it by 0)."""

    def __init__(self, mode: str, channels: int, cbn_classes: int) -> None:
        super().__init__(channels, cbn_classes)
        self.mode = mode

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        mode = "nearest" if self.mode == "none" else self.mode
        align = False if mode == "bilinear" else None
        return super().forward(
            F.interpolate(x, scale_factor=2.0, mode=mode, align_corners=align), cond
        )

    def extra_repr(self) -> str:
        return self.mode


class Skip(nn.Module):
    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return x


class Zero(nn.Module):
    """The 'none' op; the owning cell leaves it out of its sums instead of adding zeros."""

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return torch.zeros_like(x)


def build_op(name: str, channels: int, cbn_classes: int) -> nn.Module:
    """The module of one op edge."""
    if name == "none":
        return Zero()
    spec = OPS[name]
    if spec is None:
        return Skip()
    kernel, dilation = spec
    return NormActConv(channels, cbn_classes, kernel, dilation)


class ArcCell(nn.Module):
    """Two upsample branches, the two summed nodes and the cross links (see the module doc)."""

    def __init__(self, gene: CellGenotype, channels: int, cbn_classes: int) -> None:
        super().__init__()
        self.gene = gene
        self.up = nn.ModuleList(Upsample(mode, channels, cbn_classes) for mode in gene.up)
        self.ops = nn.ModuleList(build_op(name, channels, cbn_classes) for name in gene.ops)
        self.links = nn.ModuleList(Upsample(mode, channels, cbn_classes) for mode in gene.links)
        self.live_ops = [(i, *OP_EDGES[i]) for i, name in enumerate(gene.ops) if name != "none"]
        self.live_links = [
            (i, *LINK_EDGES[i]) for i, mode in enumerate(gene.links) if mode != "none"
        ]

    def forward(self, x: Tensor, cond: Tensor, previous: Sequence[Tensor]) -> list[Tensor]:
        """The cell's nodes [n0, n1, n2, n3]; ``previous`` is the previous cell's (or [])."""
        nodes = [branch(x, cond) for branch in self.up]
        for target in (2, 3):
            terms = [
                self.ops[i](nodes[src], cond) for i, src, dst in self.live_ops if dst == target
            ]
            terms += [
                self.links[i](previous[src], cond)
                for i, src, dst in self.live_links
                if dst == target
            ]
            nodes.append(_sum(terms, like=nodes[0]))
        return nodes


def _sum(terms: list[Tensor], like: Tensor) -> Tensor:
    """Sum of a node's inputs; zeros when every input edge is 'none'."""
    if not terms:
        return torch.zeros_like(like)
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


class ArcGenerator(nn.Module):
    """AutoReCon's cell generator, called as ``generator(z, cond)`` (see the module doc).

    ``cond`` is hard labels (B,) or class weights (B, num_classes); z is (B, latent_dim).
    ``genotype`` is 'auto', a name in ``GENOTYPES`` or a sequence of ``CellGenotype`` (any
    number of cells; the image side is then generated at ``ceil(side / 2**cells) * 2**cells``).
    ``width`` (reference 64) exists to build small generators for tests.
    """

    def __init__(
        self,
        num_classes: int,
        image_shape: Sequence[int],
        *,
        latent_dim: int = DEFAULT_LATENT_DIM,
        width: int = DEFAULT_WIDTH,
        genotype: str | Sequence[CellGenotype] = "auto",
    ) -> None:
        super().__init__()
        channels, height, width_px = check_image_shape(image_shape)
        self.num_classes = check_num_classes(num_classes)
        self.genotype_name, self.genotype = resolve_genotype(genotype, num_classes, image_shape)
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
        self.bottom_hw = (-(-height // factor), -(-width_px // factor))  # ceil: crop at the end
        self.parts = latent_split(latent_dim, cells)
        self.grids = [(self.bottom_hw[0] * 2**i, self.bottom_hw[1] * 2**i) for i in range(cells)]
        self.latent_maps = nn.ModuleList(
            nn.Linear(part, width * h * w)
            for part, (h, w) in zip(self.parts, self.grids, strict=True)
        )
        cbn_classes = max(CELL_CBN_CLASSES, num_classes)
        self.cells = nn.ModuleList(ArcCell(gene, width, cbn_classes) for gene in self.genotype)
        self.norm_out = CellConditionalBatchNorm2d(width, num_classes, eps=BN_EPS)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: Tensor, cond: Tensor) -> Tensor:
        parts = torch.split(z, self.parts, dim=1)
        nodes: list[Tensor] = []
        x: Tensor | None = None
        for latent_map, part, grid, cell in zip(
            self.latent_maps, parts, self.grids, self.cells, strict=True
        ):
            mapped = latent_map(part).view(z.shape[0], self.width, *grid)
            x = mapped if x is None else x + mapped
            nodes = cell(x, cond, nodes)
            x = nodes[3]
        x = F.leaky_relu(self.norm_out(x, cond), LEAK)
        x = torch.tanh(self.conv_out(x))
        return self.bn_out(center_crop(x, self.image_shape[1:]))

    def extra_repr(self) -> str:
        return f"genotype={self.genotype_name!r}, bottom={self.bottom_hw}, latent={self.parts}"


def latent_split(latent_dim: int, cells: int) -> list[int]:
    """The reference's split: ``latent // cells`` per cell, the last also takes the rest."""
    part = latent_dim // cells
    return [part] * (cells - 1) + [latent_dim - part * (cells - 1)]


def center_crop(x: Tensor, size: Sequence[int]) -> Tensor:
    """The central ``size`` window of the last two dims (a no-op when they already match)."""
    height, width = size
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


def _read_genotype(value: Any) -> Any:
    """A genotype name ('auto' included), or a sequence of cells (checked when built)."""
    if isinstance(value, str):
        if value.strip().lower() not in ("auto", *GENOTYPES):
            raise ValueError(value)
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(value)
    if not all(isinstance(cell, CellGenotype) for cell in value):
        raise TypeError(value)
    return value


ARC_OPTIONS: dict[str, Rule] = {
    "genotype": Rule(
        f"'auto', one of {', '.join(GENOTYPES)}, or (from Python) a list of CellGenotype",
        "auto",
        _read_genotype,
    ),
    # every named genotype has 3 cells, each given a part of the latent (a custom genotype with
    # fewer cells may take less: ArcGenerator checks that)
    "latent_dim": whole_number(1, example=DEFAULT_LATENT_DIM),
    "width": whole_number(1, example=DEFAULT_WIDTH),
    **{name: GENERATOR_OPTIONS[name] for name in ("bns_weight", "lr", "betas")},
}


class ArcSource(GdfqSource):
    """ARC as a sample source: GDFQ's step and loss (CE + ``bns_weight`` * BNS, Adam) on an
    ``ArcGenerator``. See ``GdfqSource`` for the training contract."""

    OPTIONS: ClassVar[dict[str, Rule]] = ARC_OPTIONS

    def __init__(
        self,
        teacher: nn.Module,
        *,
        num_classes: int,
        image_shape: Sequence[int],
        genotype: str | Sequence[CellGenotype] = "auto",
        latent_dim: int = DEFAULT_LATENT_DIM,
        width: int = DEFAULT_WIDTH,
        bns_weight: float = 0.1,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
    ) -> None:
        options = read_options("arc source", ARC_OPTIONS, locals())
        generator = ArcGenerator(
            num_classes, image_shape, latent_dim=latent_dim, width=width, genotype=genotype
        )
        log.info("ARC genotype %s", generator.genotype_name)
        super().__init__(
            teacher,
            num_classes=num_classes,
            image_shape=image_shape,
            latent_dim=latent_dim,
            bns_weight=bns_weight,
            lr=lr,
            betas=options["betas"],
            generator=generator,
        )
