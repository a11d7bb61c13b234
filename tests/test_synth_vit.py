"""PSAQ-ViT and MimiQ sample sources: their losses against hand-computed values, and the sources
on the Fashion-MNIST ViT teacher (tiny step counts)."""

import logging
import math

import pytest
import torch
from tests._teachers import tiny_teacher

from zsq.errors import ZsqError
from zsq.paths import shared_data_dir
from zsq.synth import (
    MimiqSource,
    PsaqSource,
    SynthBatch,
    build_source,
    head_alignment_loss,
    mean_interhead_similarity,
    patch_similarity_entropy,
    total_variation,
)
from zsq.synth.vit_losses import interhead_ssim, kde_entropy

pytest.importorskip("timm")

SHAPE = (1, 28, 28)
GRID = 7  # 28 px in patches of 4
TOKENS = 1 + GRID * GRID
SMALL_VIT = {
    "img_size": 16,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 3,
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 2,
}


@pytest.fixture(scope="module")
def vit():
    """The ViT teacher (4 blocks of 4 heads on a 7x7 patch grid) and its metadata."""
    from zsq.models import load_teacher

    weights = shared_data_dir() / "weights" / "vit_fashionmnist.safetensors"
    if not weights.is_file():
        pytest.skip(f"ViT teacher not found under {shared_data_dir()}")
    return load_teacher(None, weights)


def _build(name, teacher, **kwargs):
    kwargs.setdefault("progress", False)
    return build_source(name, teacher, num_classes=10, image_shape=SHAPE, **kwargs)


def _maps(batch: int, heads: int, seed: int = 0, sharpness: float = 3.0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.softmax(torch.randn(batch, heads, TOKENS, TOKENS) * sharpness, dim=-1)


# --- total variation ---------------------------------------------------------------------------


def test_total_variation_of_a_constant_is_zero_and_of_a_2x2_pattern_is_hand_computed():
    assert total_variation(torch.full((2, 3, 5, 4), 0.7)).item() == 0.0
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 1, 2, 2)
    # right: (1, 1) -> sqrt 2; down: (2, 2) -> 2 sqrt 2; diagonals: 2 - 1 = 1 and 3 - 0 = 3
    assert total_variation(x).item() == pytest.approx(4 + 3 * math.sqrt(2), rel=1e-6)


# --- patch-similarity entropy ------------------------------------------------------------------


def test_patch_similarity_entropy_is_higher_for_diverse_patches():
    torch.manual_seed(0)
    diverse = torch.randn(4, TOKENS, 64)
    identical = torch.randn(4, 1, 64).expand(4, TOKENS, 64)
    high, low = patch_similarity_entropy(diverse), patch_similarity_entropy(identical)
    assert high > low + 1
    # all similarities 1: the entropy of one Gaussian kernel, log(h sqrt(2 pi e)), h = 0.01
    assert low.item() == pytest.approx(math.log(0.01 * math.sqrt(2 * math.pi * math.e)), abs=0.01)


def test_kde_entropy_of_gaussian_samples_matches_the_closed_form():
    torch.manual_seed(0)
    sigma, h = 0.2, 0.01
    samples = torch.randn(2, 20000) * sigma
    expected = 0.5 * math.log(2 * math.pi * math.e * (sigma**2 + h**2))
    assert kde_entropy(samples, h, points=400).item() == pytest.approx(expected, abs=0.02)


def test_patch_similarity_entropy_reaches_the_image():
    from zsq.models import create_model

    torch.manual_seed(0)
    model = create_model("timm:vit_tiny_patch16_224", model_kwargs=SMALL_VIT)
    images = torch.randn(2, 1, 16, 16, requires_grad=True)
    features = model.forward_features(images)
    patch_similarity_entropy(features).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


# --- head alignment ----------------------------------------------------------------------------


def test_head_alignment_is_exactly_zero_for_identical_heads_and_positive_otherwise():
    same = _maps(2, 1).expand(2, 4, TOKENS, TOKENS)
    assert head_alignment_loss(same).item() == 0.0
    assert head_alignment_loss(same, signed=False).item() == 0.0
    differ = _maps(2, 4, seed=1)
    assert 0.5 < head_alignment_loss(differ).item() < 2
    assert head_alignment_loss(_maps(2, 1)).item() == 0.0  # one head: nothing to align


def test_ssim_of_one_window_matches_the_formula_written_out():
    attn = _maps(1, 2, seed=2).double()
    ssim = interhead_ssim(attn)  # 7x7 grid: one 7x7 Gaussian window (sigma 1.5)
    assert ssim.shape == (1, GRID * GRID, 1)
    taps = torch.arange(7, dtype=torch.float64) - 3
    w = torch.exp(-(taps**2) / (2 * 1.5**2))
    w = (w[:, None] * w[None, :]) / w.sum() ** 2
    for query in (0, 17, 48):
        a = attn[0, 0, 1 + query, 1:].reshape(7, 7)
        b = attn[0, 1, 1 + query, 1:].reshape(7, 7)
        scale = torch.maximum(a.max(), b.max())
        a, b = a / scale, b / scale
        mu_a, mu_b = (w * a).sum(), (w * b).sum()
        var_a, var_b = (w * a * a).sum() - mu_a**2, (w * b * b).sum() - mu_b**2
        cov = (w * a * b).sum() - mu_a * mu_b
        c1, c2 = 0.01**2, 0.03**2
        expected = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
            (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
        )
        assert ssim[0, query, 0].item() == pytest.approx(expected.item(), abs=1e-5)


def test_anti_aligned_heads_are_penalised_not_rewarded():
    base = torch.zeros(1, 1, TOKENS, TOKENS)
    base[..., 1:] = torch.rand(1, 1, TOKENS, TOKENS - 1).round() + 0.1
    inverse = base.clone()
    inverse[..., 1:] = 1.2 - base[..., 1:]
    attn = torch.cat([base, inverse], dim=1)
    attn = attn / attn.sum(-1, keepdim=True)
    assert interhead_ssim(attn).mean() < -0.5
    assert head_alignment_loss(attn).item() > 1.25  # 1 - SSIM |SSIM|
    assert head_alignment_loss(attn, signed=False).item() < 0.75  # the plain square rewards it


def test_mean_interhead_similarity_is_one_for_identical_heads(vit):
    import copy

    teacher = copy.deepcopy(vit[0])
    with torch.no_grad():
        for block in teacher.blocks:
            qkv, dim, width = block.attn.qkv, block.attn.head_dim, block.attn.qkv.out_features // 3
            for part in (0, 1):  # q and k of every head copied from head 0
                rows = slice(part * width, part * width + dim)
                for head in range(1, block.attn.num_heads):
                    to = slice(part * width + head * dim, part * width + (head + 1) * dim)
                    qkv.weight[to] = qkv.weight[rows]
                    qkv.bias[to] = qkv.bias[rows]
    torch.manual_seed(0)
    images = torch.randn(6, *SHAPE)
    assert mean_interhead_similarity(teacher, images, batch_size=4) == pytest.approx(1, abs=1e-5)
    assert mean_interhead_similarity(vit[0], images) < 0.5


# --- the sources on the ViT teacher ------------------------------------------------------------


@pytest.mark.parametrize("name", ["psaq", "mimiq"])
def test_source_returns_batches_from_its_pool(vit, name):
    teacher, meta = vit
    source = _build(
        name,
        teacher,
        num_images=4,
        steps=5,
        batch_size=2,
        normalize_mean=meta.normalize_mean,
        normalize_std=meta.normalize_std,
    )
    torch.manual_seed(0)
    batch = source.sample(6)
    assert isinstance(batch, SynthBatch)
    assert batch.images.shape == (6, *SHAPE) and batch.targets.shape == (6, 10)
    assert torch.allclose(batch.targets.sum(1), torch.ones(6))
    pool, labels = source.images(), source.labels()
    assert pool.shape == (4, *SHAPE) and labels.shape == (4,)
    rows = [int((pool == image).flatten(1).all(1).nonzero()[0]) for image in batch.images]
    assert batch.labels.tolist() == labels[rows].tolist()  # each image keeps its own label
    low, high = (0 - 0.286) / 0.353, (1 - 0.286) / 0.353
    assert pool.min() >= low - 1e-6 and pool.max() <= high + 1e-6  # clipped to valid pixels
    report = source.report
    assert len(report["batches"]) == 2 and len(report["labels"]) == 4
    assert {"loss_start", "loss_end", "terms_start", "terms_end"} <= set(report["batches"][0])


def test_psaq_loss_falls_in_20_steps(vit):
    source = _build("psaq", vit[0], num_images=4, steps=20, jitter=False, flip=False)
    torch.manual_seed(0)
    source.images()
    batch = source.report["batches"][0]
    assert batch["loss_end"] < batch["loss_start"]
    assert batch["terms_end"]["ce"] < batch["terms_start"]["ce"]


def test_mimiq_loss_falls_in_20_steps(vit):
    source = _build("mimiq", vit[0], num_images=4, steps=20)
    torch.manual_seed(0)
    source.images()
    batch = source.report["batches"][0]
    assert batch["loss_end"] < batch["loss_start"]
    assert batch["terms_end"]["align"] < batch["terms_start"]["align"]
    assert batch["terms_end"]["ce"] < batch["terms_start"]["ce"]


@pytest.mark.parametrize("cls", [PsaqSource, MimiqSource])
def test_cache_round_trip_loads_instead_of_synthesising(vit, tmp_path, caplog, cls):
    cache = tmp_path / "pool.safetensors"
    options = {"num_images": 3, "steps": 2, "cache": cache}
    first = _build(cls.name, vit[0], **options)
    torch.manual_seed(0)
    images, labels = first.images(), first.labels()
    assert cache.is_file()
    second = _build(cls.name, vit[0], **options)
    with caplog.at_level(logging.INFO):
        assert torch.equal(second.images(), images)
    assert f"{cls.name}: 3 images loaded from" in caplog.text and "seconds" in second.report
    assert torch.equal(second.labels(), labels)
    other = _build(cls.name, vit[0], **{**options, "steps": 3})
    with pytest.raises(ZsqError, match="other options"):
        other.images()


@pytest.mark.parametrize("name", ["psaq", "mimiq"])
def test_cnn_teacher_is_refused_with_one_line(name):
    with pytest.raises(ZsqError) as err:
        build_source(name, tiny_teacher(), num_classes=10, image_shape=(3, 8, 8))
    message = str(err.value)
    assert "\n" not in message and name in message
    cnn_sources = message.split("sources that work for CNNs:")[1]
    assert "zeroq" in cnn_sources and "gdfq" in cnn_sources
    assert "psaq" not in cnn_sources and "mimiq" not in cnn_sources


@pytest.mark.parametrize("name", ["psaq", "mimiq"])
def test_zero_steps_is_the_gaussian_noise_baseline(vit, name):
    """steps=0 keeps the pool's starting draw: standard Gaussian noise, labelled as it was."""
    source = _build(name, vit[0], steps=0, num_images=64, batch_size=None)
    torch.manual_seed(3)
    labels = torch.randint(0, 10, (64,))
    noise = torch.randn(64, *SHAPE)
    torch.manual_seed(3)
    assert torch.equal(source.images(), noise) and torch.equal(source.labels(), labels)
    assert source.report["batches"] == [{"images": 64}]


def test_bad_options_say_how_to_fix(vit):
    with pytest.raises(ZsqError, match="steps"):
        _build("mimiq", vit[0], steps=-1)
    with pytest.raises(ZsqError, match="normalize_mean needs 1 value"):
        _build("psaq", vit[0], normalize_mean=[0.1, 0.2])
    with pytest.raises(ZsqError, match="does not take"):
        _build("psaq", vit[0], bandwidth=0.1)
