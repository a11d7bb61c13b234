"""Tests for the ARC sample source (zsq.synth.arc)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _teachers import tiny_teacher
from zsq.errors import ZsqError
from zsq.synth import GENOTYPES, ArcGenerator, ArcSource, CellGenotype, build_source
from zsq.synth.arc import center_crop, latent_split


def changed_params(module: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


# Parameter totals of the official generator, `Generator(gen_X, options)` from
# AutoReCon_AIT/model_generator.py + generator_architecture.py (latent_dim 100; dataset cifar10 /
# cifar100 -> bottom width 4, imagenet -> 28; nClasses 10 / 100 / 1000), counted by running that
# code on CPU.
REFERENCE_PARAM_COUNTS = [
    ("cifar10", 10, (3, 32, 32), 5_995_459),
    ("cifar100", 100, (3, 32, 32), 6_138_051),
    ("resnet18", 1000, (3, 224, 224), 42_397_443),
    ("resnet50", 1000, (3, 224, 224), 42_200_835),
    ("mobilenetv2", 1000, (3, 224, 224), 42_168_067),
]


@pytest.mark.parametrize(("genotype", "num_classes", "shape", "expected"), REFERENCE_PARAM_COUNTS)
def test_parameter_count_matches_the_reference(genotype, num_classes, shape, expected) -> None:
    with torch.device("meta"):  # counts only: no 42M-parameter allocation
        gen = ArcGenerator(num_classes, shape, genotype=genotype)
    assert gen.genotype == GENOTYPES[genotype]
    assert sum(p.numel() for p in gen.parameters()) == expected


def test_every_official_genotype_is_tested() -> None:
    assert {row[0] for row in REFERENCE_PARAM_COUNTS} == set(GENOTYPES)


@pytest.mark.parametrize(
    ("num_classes", "shape", "genotype"),
    [
        (10, (3, 32, 32), "cifar10"),
        (10, (1, 28, 28), "cifar10"),
        (100, (3, 32, 32), "cifar100"),
        (1000, (3, 224, 224), "resnet18"),
    ],
)
def test_auto_picks_the_genotype_like_the_reference(num_classes, shape, genotype) -> None:
    with torch.device("meta"):
        assert ArcGenerator(num_classes, shape).genotype_name == genotype


@pytest.mark.parametrize(
    ("shape", "width", "bottom"),
    [((3, 32, 32), 64, (4, 4)), ((1, 28, 28), 64, (4, 4)), ((3, 224, 224), 8, (28, 28))],
)
def test_output_matches_teacher_input_shape(shape, width, bottom) -> None:
    torch.manual_seed(0)
    gen = ArcGenerator(10, shape, width=width)  # width 8 keeps the 224 px case fast
    assert gen.bottom_hw == bottom  # 28 px: generated at 32, centre-cropped
    with torch.no_grad():
        out = gen(torch.randn(2, 100), torch.tensor([1, 4]))
    assert out.shape == (2, *shape)
    assert torch.isfinite(out).all()
    # the output BN (train mode, no affine) normalises each channel over the kept pixels
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(shape[0]), atol=1e-5, rtol=0)


def test_latent_is_split_like_the_reference() -> None:
    assert latent_split(100, 3) == [33, 33, 34]
    gen = ArcGenerator(10, (3, 32, 32), width=4)
    assert [m.in_features for m in gen.latent_maps] == [33, 33, 34]
    assert [m.out_features for m in gen.latent_maps] == [4 * 4 * 4, 4 * 8 * 8, 4 * 16 * 16]


def test_generator_is_class_conditional() -> None:
    torch.manual_seed(0)
    gen = ArcGenerator(10, (3, 16, 16), width=8)
    with torch.no_grad():  # conditional BN starts class-agnostic (gamma 1, beta 0): perturb it
        for name, param in gen.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.5)
        z = torch.randn(4, 100)
        a = gen(z, torch.tensor([0, 1, 2, 3]))
        b = gen(z, torch.tensor([4, 5, 6, 7]))
        soft = gen(z, F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float())
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, soft)  # soft weights over 10 classes use rows 0..9 of 1000


def test_none_links_hold_parameters_but_add_nothing() -> None:
    torch.manual_seed(0)
    gen = ArcGenerator(10, (3, 16, 16), width=8, genotype="cifar10")
    link = gen.cells[1].links[0]
    assert gen.genotype[1].links[0] == "none" and sum(p.numel() for p in link.parameters()) > 0
    z, labels = torch.randn(4, 100), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        before = gen(z, labels)
        for param in link.parameters():
            param.add_(1.0)
        torch.testing.assert_close(gen(z, labels), before, rtol=0, atol=0)


def test_step_trains_the_generator() -> None:
    teacher = tiny_teacher()
    source = ArcSource(teacher, num_classes=10, image_shape=(3, 8, 8), width=8)
    assert source.generator.genotype_name == "cifar10"
    before = copy.deepcopy(source.generator.state_dict())
    batch, terms = source.step(8)
    assert batch.images.shape == (8, 3, 8, 8) and batch.labels is not None
    assert set(terms) == {"gen_ce", "gen_bns", "gen_loss"}
    changed = changed_params(source.generator, before)
    for prefix in (
        "latent_maps.0.",
        "latent_maps.2.",
        "cells.0.ops.0.",
        "cells.2.links.",
        "conv_out",
    ):
        assert any(k.startswith(prefix) for k in changed), prefix
    assert all(p.grad is None for p in teacher.parameters())


def test_genotype_is_a_source_option() -> None:
    source = build_source(
        "arc", tiny_teacher(), num_classes=10, image_shape=(3, 8, 8), width=4, genotype="resnet50"
    )
    assert source.generator.genotype == GENOTYPES["resnet50"]


def test_bad_genotypes_and_latents_are_one_line_user_errors() -> None:
    first = CellGenotype(("nearest", "bilinear"), ("conv3x3",) * 5)
    bad = {
        "genotype": "big",
        "ops": [CellGenotype(("nearest", "nearest"), ("conv7x7",) * 5)],
        "up": [CellGenotype(("nearest",), ("skip",) * 5)],
        "links": [first, first],  # a later cell needs its 6 cross links
    }
    for match, genotype in bad.items():
        with pytest.raises(ZsqError, match=match) as info:
            ArcGenerator(10, (3, 32, 32), genotype=genotype)
        assert "\n" not in str(info.value)
    with pytest.raises(ZsqError, match="latent_dim"):
        ArcGenerator(10, (3, 32, 32), latent_dim=2)


def test_custom_genotype_sets_the_number_of_cells() -> None:
    none_into_n2 = ("none", "none", "skip", "conv1x1", "conv3x3")  # n2 sums nothing: zeros
    cells = [
        CellGenotype(("bilinear", "nearest"), none_into_n2),
        CellGenotype(("nearest", "nearest"), none_into_n2, ("none",) * 3 + ("bilinear",) * 3),
    ]
    gen = ArcGenerator(3, (1, 10, 10), latent_dim=7, width=4, genotype=cells)
    assert gen.genotype_name == "custom" and gen.parts == [3, 4]
    assert gen.bottom_hw == (3, 3)  # ceil(10 / 4); 12 x 12 generated, centre-cropped to 10 x 10
    with torch.no_grad():
        out = gen(torch.randn(2, 7), torch.tensor([0, 2]))
    assert out.shape == (2, 1, 10, 10) and torch.isfinite(out).all()


def test_center_crop_takes_the_middle() -> None:
    x = torch.arange(36.0).view(1, 1, 6, 6)
    assert torch.equal(center_crop(x, (4, 4)), x[..., 1:5, 1:5])
    assert torch.equal(center_crop(x, (6, 6)), x)
