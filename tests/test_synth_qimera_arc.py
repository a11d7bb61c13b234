"""Tests for the Qimera and ARC sample sources (zsq.synth.qimera, zsq.synth.arc)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _teachers import tiny_source, tiny_teacher
from zsq.errors import ZsqError
from zsq.synth import (
    GENOTYPES,
    ArcGenerator,
    ArcSource,
    CellGenotype,
    QimeraSource,
    build_source,
)
from zsq.synth.arc import center_crop


def make_qimera(teacher: nn.Module | None = None, **kwargs) -> QimeraSource:
    return tiny_source(QimeraSource, teacher, **kwargs)


def changed_params(module: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


# --- Qimera -----------------------------------------------------------------------------------


def test_qimera_superposed_targets_put_lambdas_on_k_distinct_classes() -> None:
    source = make_qimera(mix_prob=1.0, num_mix=3)
    torch.manual_seed(5)
    cond, targets, labels = source.draw_targets(16)
    assert labels is None
    assert torch.equal(cond, targets)
    torch.testing.assert_close(targets.sum(1), torch.ones(16))
    assert torch.equal(torch.count_nonzero(targets, dim=1), torch.full((16,), 3))

    torch.manual_seed(5)  # replay: the superposed-or-not draw comes first, then the mixture
    torch.rand(())
    classes, lambdas = source.draw_mixture(16)
    assert all(len(set(row.tolist())) == 3 for row in classes)
    assert torch.equal(targets.gather(1, classes), lambdas)


def test_qimera_plain_batches_are_gdfq_batches() -> None:
    source = make_qimera(mix_prob=0.0)
    cond, targets, labels = source.draw_targets(16)
    assert cond.dim() == 1 and torch.equal(cond, labels)
    assert torch.equal(targets, F.one_hot(labels, 10).float())
    batch = source.sample(16)
    assert batch.labels is not None and torch.equal(batch.targets.argmax(1), batch.labels)
    assert batch.images.shape == (16, 3, 8, 8)


def test_qimera_mix_prob_decides_per_batch() -> None:
    source = make_qimera(mix_prob=0.5)
    torch.manual_seed(0)
    kinds = {source.draw_targets(4)[2] is None for _ in range(20)}
    assert kinds == {True, False}


def test_superposed_code_is_the_lambda_weighted_normalised_embedding_times_noise() -> None:
    source = make_qimera(num_mix=2)
    table = source.generator.embedding.weight.detach()
    classes = torch.tensor([[3, 7], [0, 9]])
    lambdas = torch.tensor([[0.7, 0.3], [0.6, 0.4]])  # descending: slot k <-> k-th largest
    weights = torch.zeros(2, 10).scatter_(1, classes, lambdas)
    z = torch.randn(2, 2, source.latent_dim)
    unit = table / table.norm(dim=1, keepdim=True)
    expected = (lambdas[:, :, None] * unit[classes] * z).sum(1)
    torch.testing.assert_close(source.superposed_code(z, weights), expected)


def test_qimera_superposed_step_trains_the_generator_on_soft_targets() -> None:
    source = make_qimera(mix_prob=1.0)
    before = copy.deepcopy(source.generator.state_dict())
    batch, terms = source.step(16)
    assert batch.labels is None
    assert batch.images.shape == (16, 3, 8, 8) and not batch.images.requires_grad
    torch.testing.assert_close(batch.targets.sum(1), torch.ones(16))
    torch.testing.assert_close(terms["gen_loss"], terms["gen_ce"] + 0.1 * terms["gen_bns"])
    changed = changed_params(source.generator, before)
    assert any(k.startswith("embedding.") for k in changed)
    assert any(k.startswith("fc.") for k in changed)


@pytest.mark.parametrize("kind", ["gdfq-imagenet", "arc"])
def test_qimera_batchnorm_conditioned_generators_superpose_through_cbn(kind: str) -> None:
    if kind == "arc":
        source = make_qimera(mix_prob=1.0, generator=ArcGenerator(10, (3, 8, 8), width=8))
    else:
        source = make_qimera(mix_prob=1.0, variant="imagenet", latent_dim=8)
    before = copy.deepcopy(source.generator.state_dict())
    batch, _ = source.step(8)
    assert batch.labels is None and batch.images.shape == (8, 3, 8, 8)
    assert any(".weight.weight" in k for k in changed_params(source.generator, before))


def test_init_from_teacher_copies_the_classifier_rows() -> None:
    teacher = tiny_teacher()
    source = make_qimera(teacher, init_from_teacher=True)
    assert source.latent_dim == 16  # sized to the classifier's input
    assert torch.equal(source.generator.embedding.weight, teacher[-1].weight)


def test_init_from_teacher_rejects_bad_combinations_before_hooking_the_teacher() -> None:
    teacher = tiny_teacher()
    with pytest.raises(ZsqError, match="latent_dim=16"):
        make_qimera(teacher, init_from_teacher=True, latent_dim=100)
    with pytest.raises(ZsqError, match="variant='cifar'"):
        make_qimera(teacher, init_from_teacher=True, variant="imagenet")
    with pytest.raises(ZsqError, match="out_features=7"):
        make_qimera(teacher, init_from_teacher=True, num_classes=7)
    assert all(len(m._forward_pre_hooks) == 0 for m in teacher.modules())
    assert all(p.requires_grad for p in teacher.parameters())


def test_disentangle_mapping_starts_as_identity_and_trains() -> None:
    source = make_qimera(mix_prob=1.0, disentangle=True)
    torch.testing.assert_close(source.mapping.weight, torch.eye(100))
    assert source.mapping.weight in source.optimizer.param_groups[1]["params"]
    before = source.mapping.weight.detach().clone()
    source.step(8)
    assert not torch.equal(source.mapping.weight, before)
    assert any(k.startswith("mapping.") for k in source.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"mix_prob": 1.5}, "mix_prob"), ({"num_mix": 11}, "num_mix"), ({"num_mix": 0}, "num_mix")],
)
def test_qimera_bad_options_are_user_errors(kwargs, match) -> None:
    with pytest.raises(ZsqError, match=match):
        make_qimera(**kwargs)


# --- ARC --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "genotype"),
    [((3, 32, 32), "cifar"), ((1, 28, 28), "cifar"), ((3, 224, 224), "imagenet")],
)
def test_arc_generator_output_matches_teacher_input_shape(shape, genotype) -> None:
    torch.manual_seed(0)
    gen = ArcGenerator(10, shape)
    assert gen.genotype == GENOTYPES[genotype]
    with torch.no_grad():
        out = gen(torch.randn(2, 120), torch.tensor([1, 4]))
    assert out.shape == (2, *shape)
    assert torch.isfinite(out).all()


def test_arc_generator_is_class_conditional() -> None:
    torch.manual_seed(0)
    gen = ArcGenerator(10, (3, 16, 16), latent_dim=12, width=8)
    with torch.no_grad():  # conditional BN starts class-agnostic (gamma 1, beta 0): perturb it
        for name, param in gen.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.5)
        z = torch.randn(4, 12)
        a = gen(z, torch.tensor([0, 1, 2, 3]))
        b = gen(z, torch.tensor([4, 5, 6, 7]))
        soft = gen(z, F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float())
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, soft)


def test_arc_step_trains_the_generator() -> None:
    teacher = tiny_teacher()
    source = ArcSource(teacher, num_classes=10, image_shape=(3, 8, 8), width=16)
    before = copy.deepcopy(source.generator.state_dict())
    batch, terms = source.step(8)
    assert batch.images.shape == (8, 3, 8, 8) and batch.labels is not None
    assert set(terms) == {"gen_ce", "gen_bns", "gen_loss"}
    changed = changed_params(source.generator, before)
    assert any(k.startswith("stem.") for k in changed)
    assert any(k.startswith("cells.2.") for k in changed)
    assert all(p.grad is None for p in teacher.parameters())


def test_arc_rejects_bad_genotypes_and_latents() -> None:
    with pytest.raises(ZsqError, match="genotype"):
        ArcGenerator(10, (3, 32, 32), genotype="big")
    with pytest.raises(ZsqError, match="ops"):
        ArcGenerator(10, (3, 32, 32), genotype=[CellGenotype("nearest", ("conv7x7",) * 3)])
    with pytest.raises(ZsqError, match="earlier cells"):
        ArcGenerator(
            10, (3, 32, 32), genotype=[CellGenotype("nearest", ("skip",) * 3, skips_from=(0,))]
        )
    with pytest.raises(ZsqError, match="latent_dim"):
        ArcGenerator(10, (3, 32, 32), latent_dim=2)


def test_custom_genotype_sets_the_number_of_cells() -> None:
    cells = [CellGenotype("bilinear", ("conv3x3", "skip", "conv1x1"))] * 2
    gen = ArcGenerator(3, (1, 10, 10), latent_dim=6, width=4, genotype=cells)
    assert gen.init_hw == (3, 3)  # ceil(10 / 4); 12 x 12 generated, centre-cropped to 10 x 10
    with torch.no_grad():
        assert gen(torch.randn(2, 6), torch.tensor([0, 2])).shape == (2, 1, 10, 10)


def test_center_crop_takes_the_middle() -> None:
    x = torch.arange(36.0).view(1, 1, 6, 6)
    assert torch.equal(center_crop(x, (4, 4)), x[..., 1:5, 1:5])
    assert torch.equal(center_crop(x, (6, 6)), x)


def test_build_source_knows_qimera_and_arc() -> None:
    teacher = tiny_teacher()
    qimera = build_source(
        "qimera", teacher, num_classes=10, image_shape=(3, 8, 8), mix_prob=0.7, num_mix=4
    )
    assert isinstance(qimera, QimeraSource) and (qimera.mix_prob, qimera.num_mix) == (0.7, 4)
    qimera.close()
    arc = build_source("ARC", teacher, num_classes=10, image_shape=(3, 8, 8), width=8)
    assert isinstance(arc, ArcSource) and isinstance(arc.generator, ArcGenerator)
    with pytest.raises(ZsqError, match="does not take"):
        build_source("arc", teacher, num_classes=10, image_shape=(3, 8, 8), mix_prob=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["qimera", "arc"])
def test_steps_do_not_sync_with_the_host(name: str) -> None:
    kwargs = {"mix_prob": 0.5} if name == "qimera" else {}
    source = build_source(
        name, tiny_teacher().cuda(), num_classes=10, image_shape=(3, 8, 8), **kwargs
    )
    source.step(16)  # warm-up: lazy CUDA/cuDNN initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            batch, terms = source.step(16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert batch.images.is_cuda and terms["gen_loss"].is_cuda
