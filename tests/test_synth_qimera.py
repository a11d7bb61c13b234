"""Tests for the Qimera sample source (zsq.synth.qimera) and the source registry."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _teachers import tiny_source, tiny_teacher
from zsq.errors import ZsqError
from zsq.synth import (
    ArcGenerator,
    ArcSource,
    QimeraSource,
    build_source,
)
from zsq.synth.gdfq import class_lookup
from zsq.synth.qimera import QimeraGenerator, default_num_mix, mixture_weights


def make_qimera(teacher: nn.Module | None = None, **kwargs) -> QimeraSource:
    return tiny_source(QimeraSource, teacher, **kwargs)


def changed_params(module: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


def official_input_norm(codes: torch.Tensor) -> torch.Tensor:
    """The official normaliser: a non-affine, stat-free BatchNorm1d on the transposed code."""
    reverse = tuple(reversed(range(codes.dim())))  # ``.T`` of a 2-D or 3-D tensor
    norm = nn.BatchNorm1d(1, affine=False, track_running_stats=False)  # no stats: any width
    return norm(codes.permute(reverse)).permute(reverse)


def capture_fc_input(source: QimeraSource) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    source.generator.body.fc.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    return seen


# --- targets and mixtures ---------------------------------------------------------------------


def test_mixture_weights_add_up_the_lambdas_of_a_repeated_class() -> None:
    classes = torch.tensor([[3, 3, 5], [1, 4, 9]])
    lambdas = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]])
    weights = mixture_weights(classes, lambdas, 10)
    assert weights[0, 3] == pytest.approx(0.7) and weights[0, 5] == pytest.approx(0.3)
    assert torch.count_nonzero(weights[0]) == 2
    torch.testing.assert_close(weights.sum(1), torch.ones(2))


def test_superposed_targets_accumulate_lambdas_over_classes_drawn_with_replacement() -> None:
    source = make_qimera(mix_prob=1.0, num_mix=6)
    torch.manual_seed(3)
    batch = source.sample(32)
    assert batch.labels is None
    torch.testing.assert_close(batch.targets.sum(1), torch.ones(32))

    torch.manual_seed(3)  # replay: superposed-or-not, z, then classes and lambdas
    torch.rand(())
    torch.randn(32, 6, source.latent_dim)
    classes, lambdas = source.draw_mixture(32)
    expected = torch.zeros(32, 10)
    for row in range(32):
        for k in range(6):
            expected[row, classes[row, k]] += lambdas[row, k]
    torch.testing.assert_close(batch.targets, expected)
    repeats = [len(set(row.tolist())) < 6 for row in classes]
    assert any(repeats), "the draw must contain a repeated class to test accumulation"


def test_distinct_classes_option_draws_without_replacement() -> None:
    source = make_qimera(mix_prob=1.0, num_mix=6, distinct_classes=True)
    torch.manual_seed(3)
    classes, _ = source.draw_mixture(32)
    assert all(len(set(row.tolist())) == 6 for row in classes)
    assert torch.equal(torch.count_nonzero(source.sample(32).targets, dim=1), torch.full((32,), 6))


def test_qimera_plain_batches_are_gdfq_batches() -> None:
    source = make_qimera(mix_prob=0.0)
    batch = source.sample(16)
    assert batch.labels is not None
    assert torch.equal(batch.targets, F.one_hot(batch.labels, 10).float())
    assert batch.images.shape == (16, 3, 8, 8)


def test_qimera_mix_prob_decides_per_batch() -> None:
    source = make_qimera(mix_prob=0.5)
    torch.manual_seed(0)
    kinds = {source.sample(4).labels is None for _ in range(20)}
    assert kinds == {True, False}


# --- generator input --------------------------------------------------------------------------


@pytest.mark.parametrize("noise_scale", [1.0, 0.5])
def test_plain_generator_input_is_the_per_sample_standardised_embedding_plus_noise(
    noise_scale: float,
) -> None:
    source = make_qimera(mix_prob=0.0, noise_scale=noise_scale)
    seen = capture_fc_input(source)
    torch.manual_seed(1)
    source.sample(8)
    torch.manual_seed(1)
    torch.rand(())
    z = torch.randn(8, source.latent_dim)
    labels = torch.randint(0, 10, (8,))
    table = source.generator.embedding.weight.detach()
    expected = official_input_norm(table[labels] + noise_scale * z)
    torch.testing.assert_close(seen[0], expected)
    torch.testing.assert_close(seen[0].mean(1), torch.zeros(8), atol=1e-5, rtol=0)


def test_superposed_generator_input_is_the_lambda_sum_of_per_slot_standardised_codes() -> None:
    source = make_qimera(mix_prob=1.0, num_mix=3)
    seen = capture_fc_input(source)
    torch.manual_seed(2)
    source.sample(8)
    torch.manual_seed(2)
    torch.rand(())
    z = torch.randn(8, 3, source.latent_dim)
    classes, lambdas = source.draw_mixture(8)
    table = source.generator.embedding.weight.detach()
    slots = official_input_norm(table[classes] + z)  # (B, K, latent)
    torch.testing.assert_close(slots.mean((0, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen[0], (lambdas.unsqueeze(2) * slots).sum(1))


def test_class_conditional_bn_mixes_by_the_mean_over_k() -> None:
    generator = QimeraGenerator(10, (3, 8, 8), latent_dim=8, variant="imagenet")
    table = generator.body.bn1.weight
    with torch.no_grad():
        table.weight.normal_()
    classes = torch.tensor([[2, 2, 7], [0, 5, 9]])
    lambdas = torch.softmax(torch.randn(2, 3), dim=1)
    gamma = class_lookup(table, generator.bn_condition(classes, lambdas))
    expected = (table.weight[classes] * lambdas.unsqueeze(2)).mean(1)
    torch.testing.assert_close(gamma, expected)
    assert torch.equal(generator.bn_condition(classes[:, 0]), classes[:, 0])


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
    assert any(k.startswith("body.fc.") for k in changed)


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


# --- defaults per setting ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_classes", "k"), [(10, 2), (100, 25), (1000, 250), (3, 2), (40, 10), (21843, 250)]
)
def test_num_mix_defaults_follow_the_ait_runs(num_classes: int, k: int) -> None:
    assert default_num_mix(num_classes) == k


def test_source_defaults_are_the_official_cifar10_settings() -> None:
    teacher = tiny_teacher()
    source = make_qimera(teacher)
    assert (source.mix_prob, source.num_mix, source.distinct_classes) == (0.4, 2, False)
    assert source.generator.noise_scale == 1.0 and source.generator.mapping is None
    assert source.latent_dim == 16  # the classifier's input size
    assert source.embedding_from_teacher
    assert torch.equal(source.generator.embedding.weight, teacher[-1].weight)
    assert source.generator.embedding.weight.requires_grad


def test_embeddings_are_random_above_100_classes_and_init_from_teacher_overrides() -> None:
    teacher = tiny_teacher(num_classes=200)
    source = make_qimera(teacher, num_classes=200)
    assert source.num_mix == 50 and source.latent_dim == 16
    assert not source.embedding_from_teacher
    assert not torch.equal(source.generator.embedding.weight, teacher[-1].weight)
    forced = make_qimera(teacher, num_classes=200, init_from_teacher=True)
    assert torch.equal(forced.generator.embedding.weight, teacher[-1].weight)
    off = make_qimera(tiny_teacher(), init_from_teacher=False)
    assert not off.embedding_from_teacher


def test_init_from_teacher_rejects_bad_combinations_before_hooking_the_teacher() -> None:
    teacher = tiny_teacher()
    with pytest.raises(ZsqError, match="latent_dim=16"):
        make_qimera(teacher, init_from_teacher=True, latent_dim=100)
    with pytest.raises(ZsqError, match="out_features=7"):
        make_qimera(teacher, init_from_teacher=True, num_classes=7)
    with pytest.raises(ZsqError, match="generator="):
        make_qimera(teacher, init_from_teacher=True, generator=ArcGenerator(10, (3, 8, 8)))
    assert all(len(m._forward_pre_hooks) == 0 for m in teacher.modules())
    assert all(p.requires_grad for p in teacher.parameters())
    default = make_qimera(teacher, latent_dim=100)  # the default falls back to random
    assert not default.embedding_from_teacher and default.latent_dim == 100


def test_disentangle_mapping_acts_on_each_slot_and_trains() -> None:
    source = make_qimera(mix_prob=1.0, num_mix=3, disentangle=True, latent_dim=128)
    mapping = source.generator.mapping
    assert (mapping.in_features, mapping.out_features) == (128, 100)
    assert source.generator.body.fc.in_features == 100
    z, classes = torch.randn(4, 3, 128), torch.randint(0, 10, (4, 3))
    lambdas = torch.softmax(torch.randn(4, 3), dim=1)
    slots = mapping(official_input_norm(source.generator.embedding(classes) + z))
    code = source.generator.encode(z, classes, lambdas)
    torch.testing.assert_close(code, (lambdas.unsqueeze(2) * slots).sum(1))
    before = mapping.weight.detach().clone()
    source.step(8)
    assert not torch.equal(mapping.weight, before)
    assert any(k.startswith("generator.mapping.") for k in source.state_dict())


def test_state_dict_round_trip_resumes_exactly() -> None:
    first = make_qimera(mix_prob=0.5)
    for _ in range(2):
        first.step(8)
    state = copy.deepcopy(first.state_dict())
    opt_state = copy.deepcopy(first.optimizer.state_dict())
    rng = torch.get_rng_state()
    expected = [first.step(8)[0] for _ in range(3)]
    second = make_qimera(tiny_teacher(), mix_prob=0.5)  # the same teacher weights
    second.load_state_dict(state)
    second.optimizer.load_state_dict(opt_state)
    torch.set_rng_state(rng)
    for want in expected:
        got = second.step(8)[0]
        torch.testing.assert_close(got.images, want.images)
        torch.testing.assert_close(got.targets, want.targets)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mix_prob": 1.5}, "mix_prob"),
        ({"mix_prob": "high"}, "mix_prob"),
        ({"num_mix": 0}, "num_mix"),
        ({"num_mix": 2.5}, "num_mix"),
        ({"num_mix": 11, "distinct_classes": True}, "num_mix"),
        ({"noise_scale": -1.0}, "noise_scale"),
        ({"disentangle": "yes"}, "disentangle"),
        ({"distinct_classes": 1}, "distinct_classes"),
        ({"init_from_teacher": "no"}, "init_from_teacher"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"noise_scale": 0.5, "generator": nn.Identity()}, "generator="),
    ],
)
def test_qimera_bad_options_are_user_errors(kwargs, match) -> None:
    with pytest.raises(ZsqError, match=match):
        make_qimera(**kwargs)


def test_num_mix_may_exceed_the_class_count_when_drawing_with_replacement() -> None:
    source = make_qimera(mix_prob=1.0, num_mix=11)
    torch.testing.assert_close(source.sample(4).targets.sum(1), torch.ones(4))


# --- registry ---------------------------------------------------------------------------------


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
