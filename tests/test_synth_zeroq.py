"""ZeroQ distilled data: the loss as the reference defines it, its fall, the cache, errors."""

import pytest
import torch
from tests._teachers import tiny_teacher
from torch import nn

from zsq.errors import ZsqError
from zsq.models.cifar_resnet import resnet20
from zsq.synth import ZeroQOptions, ZeroQSource, build_source, distill_images
from zsq.synth.bns import batchnorm_layers
from zsq.synth.zeroq import _BnInputs, cpu_pass_size, per_image_stats, zeroq_loss


def reference_loss(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """ZeroQ's loss written out with plain ops: per image, per channel, ||.||^2 / batch."""
    inputs = []
    handles = [
        m.register_forward_pre_hook(lambda m, a: inputs.append((m, a[0])))
        for m in teacher.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    teacher(images)
    for h in handles:
        h.remove()
    n, eps, total = images.shape[0], 1e-6, 0.0
    pairs = [(m.running_mean, torch.sqrt(m.running_var + eps), x) for m, x in inputs]
    pairs.append((torch.zeros(images.shape[1]), torch.ones(images.shape[1]), images))
    for mean_ref, std_ref, x in pairs:
        flat = x.reshape(n, x.shape[1], -1)
        mean, std = flat.mean(2), torch.sqrt(flat.var(2) + eps)
        total = total + (mean_ref - mean).norm() ** 2 / n + (std_ref - std).norm() ** 2 / n
    return total


def test_loss_equals_the_reference_formula():
    teacher = tiny_teacher()
    images = torch.randn(5, 3, 8, 8) * 0.7 + 0.2
    recorder = _BnInputs([m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)])
    teacher(images)
    ours = zeroq_loss(images, recorder.inputs)
    recorder.close()
    assert torch.allclose(ours, reference_loss(teacher, images), rtol=1e-5)


def test_per_image_statistics_have_the_exact_gradient():
    x = (torch.randn(3, 2, 4, 5, dtype=torch.float64) * 2 + 1).requires_grad_(True)

    def stats(t):
        mean, std = per_image_stats(t)
        return mean.double(), std.double()

    # the custom backward against finite differences (float64 inside, float32 statistics)
    mean, std = stats(x)
    weights = torch.randn_like(mean), torch.randn_like(std)
    grad = torch.autograd.grad((mean * weights[0]).sum() + (std * weights[1]).sum(), x)[0]
    var, ref_mean = torch.var_mean(x.flatten(2), dim=2)
    ref = (ref_mean * weights[0]).sum() + (torch.sqrt(var + 1e-6) * weights[1]).sum()
    ref_grad = torch.autograd.grad(ref, x)[0]
    assert torch.allclose(grad, ref_grad, atol=1e-5)


def test_distillation_lowers_the_loss_and_moves_bn_statistics_to_the_running_ones():
    torch.manual_seed(0)
    teacher = tiny_teacher()
    options = ZeroQOptions(steps=40, batch_size=8)
    images, report = distill_images(teacher, 16, (3, 8, 8), options, progress=False)
    assert images.shape == (16, 3, 8, 8) and not images.requires_grad
    assert [b["images"] for b in report["batches"]] == [8, 8]
    for batch in report["batches"]:
        assert batch["loss_end"] < 0.5 * batch["loss_start"]
    for name, after in report["bn_mismatch"].items():
        before = report["bn_mismatch_initial"][name]
        assert after["mean_abs_error_mean"] < before["mean_abs_error_mean"], name
        assert after["mean_abs_error_std"] < before["mean_abs_error_std"], name


def test_cpu_passes_keep_the_largest_float32_bn_input_within_16_mib():
    # ResNet-20 at 32 px: the largest BN input is 16 x 32 x 32 floats, 64 KiB an image, so 256
    # images fit in 16 MiB; passes are equal.
    teacher = resnet20().eval()
    layers = batchnorm_layers(teacher)
    sizes = [cpu_pass_size(teacher, layers, n, (3, 32, 32)) for n in (512, 300, 256, 100, 1)]
    assert sizes == [256, 150, 256, 100, 1]
    state = torch.random.get_rng_state()
    cpu_pass_size(teacher, layers, 512, (3, 32, 32))
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(not h for h in (m._forward_pre_hooks for m in layers))


def test_the_automatic_cpu_passes_give_the_images_of_explicit_passes(monkeypatch):
    import zsq.synth.zeroq as zeroq

    teacher = tiny_teacher()
    monkeypatch.setattr(zeroq, "CPU_PASS_BYTES", 1)  # one image a pass
    torch.manual_seed(0)
    auto, report = distill_images(teacher, 3, (3, 8, 8), ZeroQOptions(steps=5), progress=False)
    torch.manual_seed(0)
    explicit, _ = distill_images(
        teacher, 3, (3, 8, 8), ZeroQOptions(steps=5, batch_size=1), progress=False
    )
    assert [b["images"] for b in report["batches"]] == [1, 1, 1]
    assert torch.equal(auto, explicit)


def test_zeroq_init_is_the_references_small_uniform_noise():
    from zsq.synth.zeroq import initial_images

    x = initial_images(20000, (1, 1, 1), "zeroq", torch.device("cpu"))
    assert x.abs().max() <= 127.5 / 5418.75 + 1e-7
    assert abs(float(x.std()) - 73.6 / 5418.75) < 1e-3


def test_a_teacher_without_batchnorm_is_a_one_line_error_naming_what_works():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ZsqError) as info:
        build_source("zeroq", plain, num_classes=10, image_shape=(3, 8, 8))
    assert "BatchNorm" in str(info.value) and "gaussian" in str(info.value)
    assert "\n" not in str(info.value)


def test_the_cache_is_reused_and_refused_for_other_options(tmp_path):
    teacher = tiny_teacher()
    cache = tmp_path / "zeroq.safetensors"
    kwargs = {"num_classes": 10, "image_shape": (3, 8, 8), "num_images": 6, "progress": False}
    torch.manual_seed(1)
    first = ZeroQSource(teacher, steps=3, cache=cache, **kwargs).images()
    torch.manual_seed(2)  # a fresh distillation would start from other noise
    again = ZeroQSource(teacher, steps=3, cache=cache, **kwargs).images()
    assert torch.equal(first, again)
    with pytest.raises(ZsqError, match="other options"):
        ZeroQSource(teacher, steps=4, cache=cache, **kwargs).images()
    with pytest.raises(ZsqError, match="another teacher"):
        ZeroQSource(tiny_teacher(seed=3), steps=3, cache=cache, **kwargs).images()


def test_samples_come_from_the_pool_with_teacher_targets():
    teacher = tiny_teacher()
    source = ZeroQSource(
        teacher, num_classes=10, image_shape=(3, 8, 8), num_images=4, steps=2, progress=False
    )
    batch = source.sample(7)
    pool = source.images()
    assert all(any(torch.equal(img, p) for p in pool) for img in batch.images)
    assert torch.allclose(batch.targets.sum(1), torch.ones(7))
    assert torch.equal(batch.labels, teacher(batch.images).argmax(1))


def test_bad_options_are_one_line_errors():
    for bad in ({"init": "perlin"}, {"steps": -1}, {"precision": "fp8"}, {"lr": 0}):
        with pytest.raises(ZsqError):
            ZeroQOptions(**bad)
