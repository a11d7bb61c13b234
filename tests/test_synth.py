"""Tests for zsq.synth: BNS loss, GDFQ generators/source, Gaussian source, registry."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _interrupt import interrupt_at_call
from _teachers import tiny_source, tiny_teacher
from zsq.errors import ZsqError
from zsq.synth import (
    ArcSource,
    BatchNormStatsLoss,
    GaussianSource,
    GdfqGenerator,
    GdfqSource,
    QimeraSource,
    SynthBatch,
    available_sources,
    build_gdfq_generator,
    build_source,
    check_source_options,
)


def make_gdfq(teacher: nn.Module | None = None, **kwargs) -> GdfqSource:
    return tiny_source(GdfqSource, teacher, **kwargs)


# --- BNS loss ---------------------------------------------------------------------------------


def test_bns_loss_matches_hand_computation() -> None:
    conv = nn.Conv2d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 2.0]).view(2, 1, 1, 1))  # channel 1 = 2 * channel 0
    bn = nn.BatchNorm2d(2)
    bn.running_mean.copy_(torch.tensor([0.5, -1.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.25]))
    model = nn.Sequential(conv, bn).eval()
    # 8 values 0..7: mean 3.5, biased var 5.25; channel 1: mean 7, var 21.
    x = torch.arange(8.0).view(2, 1, 2, 2)
    bns = BatchNormStatsLoss(model)
    with bns:
        model(x)
    expected_mean_mse = ((3.5 - 0.5) ** 2 + (7.0 + 1.0) ** 2) / 2
    expected_var_mse = ((5.25 - 2.0) ** 2 + (21.0 - 0.25) ** 2) / 2
    assert bns.loss().item() == pytest.approx(expected_mean_mse + expected_var_mse, rel=1e-6)


def test_bns_loss_averages_layers_including_batchnorm1d() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.BatchNorm1d(5),
    ).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    inputs: list[tuple[nn.Module, torch.Tensor]] = []
    for m in (model[1], model[4]):
        m.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0].detach())))
    bns = BatchNormStatsLoss(model)
    with bns:
        model(torch.randn(6, 3, 6, 6))
    expected = []
    for mod, inp in inputs:
        dims = (0, 2, 3) if inp.dim() == 4 else (0,)
        mean = torch.mean(inp, dim=dims)
        var = torch.var(inp, dim=dims, unbiased=False)
        expected.append(
            ((mean - mod.running_mean) ** 2).mean() + ((var - mod.running_var) ** 2).mean()
        )
    assert len(bns.records) == 2
    torch.testing.assert_close(bns.loss(), torch.stack(expected).mean())


def test_bns_hooks_collect_only_inside_context_and_remove() -> None:
    teacher = tiny_teacher()
    bns = BatchNormStatsLoss(teacher)
    x = torch.randn(4, 3, 8, 8)
    teacher(x)
    assert bns.records == []
    with bns:
        teacher(x)
    assert len(bns.records) == 2
    teacher(x)
    assert len(bns.records) == 2
    with pytest.raises(ZsqError):
        BatchNormStatsLoss(tiny_teacher()).loss()
    bns.remove()
    assert all(len(m._forward_pre_hooks) == 0 for m in bns.layers)


def test_bns_hooks_ignore_deep_copies_of_the_teacher() -> None:
    teacher = tiny_teacher()
    bns = BatchNormStatsLoss(teacher)
    student = copy.deepcopy(teacher)
    with bns:
        student(torch.randn(4, 3, 8, 8))
    assert bns.records == []


def test_teacher_without_batchnorm_is_a_user_error() -> None:
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with pytest.raises(ZsqError, match="no BatchNorm layers"):
        BatchNormStatsLoss(no_bn)
    with pytest.raises(ZsqError, match="no BatchNorm layers"):
        GdfqSource(no_bn, num_classes=10, image_shape=(3, 8, 8))
    assert all(p.requires_grad for p in no_bn.parameters())  # not frozen on failure
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ZsqError, match="no BatchNorm layers"):
        BatchNormStatsLoss(untracked)


# --- GDFQ generator ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "batch", "conditioning"),
    [
        ((3, 32, 32), 4, "embedding"),
        ((1, 28, 28), 4, "embedding"),
        ((1, 8, 8), 4, "embedding"),
        ((3, 224, 224), 2, "batchnorm"),
    ],
)
def test_generator_output_matches_teacher_input_shape(shape, batch, conditioning) -> None:
    torch.manual_seed(0)
    gen = build_gdfq_generator(10, shape)
    assert gen.conditioning == conditioning
    with torch.no_grad():
        out = gen(torch.randn(batch, 100), torch.randint(0, 10, (batch,)))
    assert out.shape == (batch, *shape)
    assert torch.isfinite(out).all()


def test_generator_rejects_sides_not_divisible_by_four_and_bad_variant() -> None:
    with pytest.raises(ZsqError, match="multiple of 4"):
        build_gdfq_generator(10, (3, 30, 30))
    with pytest.raises(ZsqError, match="variant"):
        build_gdfq_generator(10, (3, 32, 32), variant="big")


def test_variant_override_and_soft_conditions() -> None:
    torch.manual_seed(0)
    gen = build_gdfq_generator(5, (3, 16, 16), variant="imagenet", latent_dim=8)
    assert gen.conditioning == "batchnorm"
    z = torch.randn(3, 8)
    labels = torch.tensor([0, 3, 4])
    with torch.no_grad():
        hard = gen(z, labels)
        soft = gen(z, F.one_hot(labels, 5).float())
    torch.testing.assert_close(hard, soft)


def test_generator_bn_eps_is_configurable() -> None:
    gen = GdfqGenerator(10, (3, 32, 32), bn_eps=1e-5)
    assert gen.bn1.eps == gen.bn2.eps == 1e-5
    assert build_gdfq_generator(10, (3, 32, 32)).bn1.eps == 0.8


# --- GDFQ source ------------------------------------------------------------------------------


def test_gdfq_step_updates_generator_only() -> None:
    source = make_gdfq()
    teacher = source.teacher
    teacher_before = copy.deepcopy(teacher.state_dict())
    gen_before = copy.deepcopy(source.generator.state_dict())
    batch, terms = source.step(16)

    assert set(terms) == {"gen_ce", "gen_bns", "gen_loss"}
    assert all(
        isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in terms.values()
    )
    torch.testing.assert_close(terms["gen_loss"], terms["gen_ce"] + 0.1 * terms["gen_bns"])
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    changed = [
        k for k, v in source.generator.state_dict().items() if not torch.equal(v, gen_before[k])
    ]
    assert any(k.startswith("fc.") for k in changed)

    assert batch.images.shape == (16, 3, 8, 8) and not batch.images.requires_grad
    assert batch.targets.shape == (16, 10)
    torch.testing.assert_close(batch.targets.sum(1), torch.ones(16))
    assert torch.equal(batch.targets.argmax(1), batch.labels)
    assert source.bns.records == []  # hooks collected during step only


def test_gdfq_source_puts_a_trained_teacher_back_in_eval() -> None:
    source = make_gdfq()
    source.teacher.train()
    source.step(4)
    assert not source.teacher.training


@pytest.mark.parametrize("seed", [0, 1])
def test_gdfq_steps_reduce_generator_loss(seed: int) -> None:
    teacher = tiny_teacher(seed=seed)
    with torch.no_grad():
        teacher[-1].weight.mul_(10.0)  # confident logits, so the CE term has something to learn
    torch.manual_seed(seed)
    source = make_gdfq(teacher)
    losses = [source.step(32)[1]["gen_loss"].item() for _ in range(40)]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.9 * first, (first, last)


def test_gdfq_sample_is_graph_free_and_records_nothing() -> None:
    source = make_gdfq()
    batch = source.sample(8)
    assert isinstance(batch, SynthBatch)
    assert not batch.images.requires_grad
    assert source.bns.records == []
    assert all(p.grad is None for p in source.generator.parameters())


def test_source_state_dict_holds_only_the_generator() -> None:
    source = make_gdfq()
    assert all(k.startswith("generator.") for k in source.state_dict())


def test_state_dict_round_trip_reproduces_samples_and_steps() -> None:
    a = make_gdfq()
    for _ in range(3):
        a.step(8)
    torch.manual_seed(123)
    b = make_gdfq()  # different initial weights
    # Deep copies stand in for a save/load through a file: Adam's state_dict shares its 'step'
    # tensors, and loading them in place would make both optimisers count each other's steps.
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))

    torch.manual_seed(7)
    sa = a.sample(8)
    torch.manual_seed(7)
    sb = b.sample(8)
    assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)

    torch.manual_seed(8)
    _, ta = a.step(8)
    torch.manual_seed(8)
    _, tb = b.step(8)
    assert torch.equal(ta["gen_loss"], tb["gen_loss"])
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), key


def test_gdfq_rejects_mismatched_num_classes() -> None:
    source = make_gdfq(num_classes=7)
    with pytest.raises(ZsqError, match="num_classes"):
        source.step(4)


def test_close_removes_teacher_hooks() -> None:
    source = make_gdfq()
    source.close()
    assert all(len(m._forward_pre_hooks) == 0 for m in source.bns.layers)


# --- Gaussian source and registry -------------------------------------------------------------


def test_gaussian_source_targets_are_teacher_probabilities() -> None:
    teacher = tiny_teacher()
    source = GaussianSource(teacher, num_classes=10, image_shape=(3, 8, 8))
    assert not source.trainable
    batch, terms = source.step(16)
    assert terms == {}
    assert batch.images.shape == (16, 3, 8, 8)
    torch.testing.assert_close(batch.targets.sum(1), torch.ones(16))
    assert torch.equal(batch.labels, batch.targets.argmax(1))
    assert all(p.requires_grad for p in teacher.parameters())  # no freezing needed


def test_build_source_registry() -> None:
    assert {"gdfq", "gaussian"} <= set(available_sources())
    teacher = tiny_teacher()
    source = build_source("GDFQ", teacher, num_classes=10, image_shape=(3, 8, 8), lr=1e-4)
    assert isinstance(source, GdfqSource) and source.trainable
    assert source.optimizer.param_groups[0]["lr"] == 1e-4
    gauss = build_source("gaussian", teacher, num_classes=10, image_shape=(3, 8, 8))
    assert isinstance(gauss, GaussianSource)
    with pytest.raises(ZsqError, match="gaussian"):
        build_source("nope", teacher, num_classes=10, image_shape=(3, 8, 8))
    with pytest.raises(ZsqError, match="does not take"):
        build_source("gaussian", teacher, num_classes=10, image_shape=(3, 8, 8), lr=1.0)


# --- source options as --source-opt gives them (JSON when it parses, else text) ----------------

BAD_OPTIONS = [
    ("gdfq", "betas", 0.5, "two numbers"),
    ("gdfq", "betas", "0.5", "two numbers"),
    ("gdfq", "betas", [0.5, 1.0], r"in \[0, 1\)"),
    ("gdfq", "generator", "foo", "passed from Python: it has no text form"),
    ("gdfq", "latent_dim", 0, "whole number >= 1"),
    ("gdfq", "latent_dim", 2.5, "whole number"),
    ("gdfq", "lr", 0, "> 0"),
    ("gdfq", "lr", "fast", "> 0"),
    ("gdfq", "lr", float("inf"), "> 0"),
    ("gdfq", "bns_weight", -0.1, ">= 0"),
    ("gdfq", "variant", "huge", "auto, cifar, imagenet"),
    ("gdfq", "bn_eps", 0, "> 0"),
    ("qimera", "betas", "0.5;0.9", "two numbers"),
    ("qimera", "generator", 3, "passed from Python"),
    ("qimera", "mix_prob", -0.1, r"in \[0, 1\]"),
    ("qimera", "num_mix", "many", "or null"),
    ("qimera", "latent_dim", 0, "or null"),
    ("qimera", "noise_scale", -1, ">= 0"),
    ("qimera", "disentangle", "yes", "true or false"),
    ("qimera", "lr", -1, "> 0"),
    ("arc", "genotype", 5, "'auto', one of cifar10"),
    ("arc", "genotype", "big", "'auto', one of cifar10"),
    ("arc", "genotype", ["cifar10"], "list of CellGenotype"),
    ("arc", "width", 0, "whole number >= 1"),
    ("arc", "latent_dim", -3, "whole number >= 1"),
    ("arc", "betas", 0.9, "two numbers"),
    ("arc", "bns_weight", "high", ">= 0"),
]


@pytest.mark.parametrize(("source", "option", "value", "expected"), BAD_OPTIONS)
def test_bad_source_options_are_one_line_errors_naming_the_option(
    source, option, value, expected
) -> None:
    with pytest.raises(ZsqError, match=f"^{source} source option {option} takes .*{expected}"):
        check_source_options(source, {option: value})  # no teacher: checked before any work
    teacher = tiny_teacher()
    with pytest.raises(ZsqError, match=f"^{source} source option {option} takes") as info:
        build_source(source, teacher, num_classes=10, image_shape=(3, 8, 8), **{option: value})
    assert "\n" not in str(info.value)
    assert all(p.requires_grad for p in teacher.parameters())  # refused before freezing it


@pytest.mark.parametrize("cls", [GdfqSource, QimeraSource, ArcSource])
def test_every_generator_source_option_has_a_rule(cls) -> None:
    params = set(inspect.signature(cls).parameters) - {"teacher", "num_classes", "image_shape"}
    assert set(cls.OPTIONS) == params


def test_source_options_take_their_text_forms() -> None:
    options = {"betas": "0.6, 0.99", "lr": 1, "variant": "cifar", "generator": None}
    check_source_options("gdfq", options)
    source = build_source("gdfq", tiny_teacher(), num_classes=10, image_shape=(3, 8, 8), **options)
    assert source.optimizer.param_groups[0]["betas"] == (0.6, 0.99)
    check_source_options("arc", {"genotype": "CIFAR100", "betas": [0.5, 0.9]})
    check_source_options("qimera", {"num_mix": None, "init_from_teacher": None, "mix_prob": 1})


@pytest.mark.parametrize("shape", [(3, 8), (3, 0, 8), (3.0, 8, 8)])
def test_bad_image_shape_is_a_user_error(shape) -> None:
    with pytest.raises(ZsqError, match="image_shape"):
        GaussianSource(tiny_teacher(), num_classes=10, image_shape=shape)


def test_synth_batch_checks_batch_dims() -> None:
    images = torch.zeros(4, 3, 8, 8)
    with pytest.raises(ValueError, match="targets"):
        SynthBatch(images, torch.zeros(3, 10))
    with pytest.raises(ValueError, match="labels"):
        SynthBatch(images, torch.zeros(4, 10), torch.zeros(3, dtype=torch.long))
    assert SynthBatch(images, torch.zeros(4, 10)).to("cpu").batch_size == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gdfq_step_does_not_sync_with_the_host() -> None:
    source = make_gdfq(tiny_teacher().cuda())
    source.step(16)  # warm-up: lazy CUDA/cuDNN initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            batch, terms = source.step(16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert batch.images.is_cuda and terms["gen_loss"].is_cuda


@pytest.mark.parametrize("source", ["genie", "zeroq"])
def test_a_run_stopped_while_a_pool_is_made_resumes_after_its_last_finished_batch(
    source, tmp_path, monkeypatch
):
    """Genie-D and ZeroQ keep every finished batch (an hour each for Genie-D with the
    reference's settings on a CPU): a run stopped in the second of two batches makes only
    that one again, and ends as an unbroken run, bit for bit."""
    import importlib

    import zsq

    module = importlib.import_module(f"zsq.synth.{source}")
    method = (
        zsq.Genie.smoke()
        if source == "genie"
        else zsq.ZeroQ(calib_size=8, calib_options={"steps": 3, "batch_size": 4})
    )
    small = {"image_shape": (3, 8, 8), "num_classes": 10, "device": "cpu", "progress": False}
    teacher = tiny_teacher()
    plain = zsq.quantize(teacher, method, **small, work_dir=tmp_path / "plain")
    with monkeypatch.context() as patch:
        interrupt_at_call(patch, module, "_distill_batch", 2)
        with pytest.raises(KeyboardInterrupt):
            zsq.quantize(teacher, method, **small, work_dir=tmp_path / "cut")
    kept = tmp_path / "cut.partial" / "checkpoint" / "images.pt"
    assert kept.is_file() and kept.with_name("last.pt").is_file()  # the run is resumable
    calls = interrupt_at_call(monkeypatch, module, "_distill_batch", None)
    resumed = zsq.quantize(teacher, method, **small, work_dir=tmp_path / "cut", resume=True)
    assert len(calls) == 1  # the second batch of two only
    assert (tmp_path / "cut/student.safetensors").read_bytes() == (
        tmp_path / "plain/student.safetensors"
    ).read_bytes()
    made, again = (r.report["calibration_report"] for r in (plain, resumed))
    made.pop("seconds", None), again.pop("seconds", None)
    assert made == again  # every batch's losses (and ZeroQ's BN mismatch before and after)
    assert not kept.exists()


def test_kept_images_unlike_their_own_record_are_refused_in_one_line(tmp_path):
    """A file whose header names the right options and teacher but whose images have another
    shape or count (written by other code) is refused when loaded, not met later as a shape
    error inside a forward."""
    from zsq.synth.cache import load_images, save_images

    teacher, path = tiny_teacher(), tmp_path / "images.safetensors"
    key = {"source": "genie", "size": 4, "image_shape": [3, 8, 8]}
    save_images(path, torch.zeros(4, 3, 8, 8), key, teacher, {})
    assert load_images(path, key, teacher)[0].shape == (4, 3, 8, 8)
    for wrong in (torch.zeros(4, 1, 8, 8), torch.zeros(3, 3, 8, 8), torch.zeros(4, 3, 8, 8).int()):
        save_images(path, wrong, key, teacher, {})
        with pytest.raises(ZsqError, match="not the \\[4, 3, 8, 8\\] its record names") as info:
            load_images(path, key, teacher)
        assert "\n" not in str(info.value)


def test_kept_batches_made_with_other_options_for_another_teacher_or_damaged_are_refused(tmp_path):
    from zsq.synth.cache import load_batches, save_batches

    teacher, path = tiny_teacher(), tmp_path / "images.pt"
    kept = {"images": torch.zeros(4, 3, 8, 8)}
    save_batches(path, kept, {"iters": 2}, teacher, {"loss_last": [1.0]})
    with pytest.raises(ZsqError, match="made with other options"):
        load_batches(path, {"iters": 3}, teacher)
    with pytest.raises(ZsqError, match="made for another teacher"):
        load_batches(path, {"iters": 2}, tiny_teacher(seed=1))
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ZsqError, match="damaged.*delete .*images.pt"):
        load_batches(path, {"iters": 2}, teacher)
