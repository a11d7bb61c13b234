"""timm models by name (``timm:NAME``), the ViT teacher's sidecar, and its quantized accuracy."""

import json
import logging
import shutil
import sys

import pytest
import torch

from zsq.errors import ZsqError
from zsq.models import ModelMeta, create_model, is_timm_name, load_teacher, read_sidecar
from zsq.paths import shared_data_dir

pytest.importorskip("timm")

VIT = "timm:vit_tiny_patch16_224"
TEACHER_TOP1 = 87.92  # the sidecar's test_top1, on all 10,000 test images
N_IMAGES = 2000
SMALL = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def vit_weights():
    weights = shared_data_dir() / "weights" / "vit_fashionmnist.safetensors"
    if not weights.is_file() or not (shared_data_dir() / "fashion-mnist").is_dir():
        pytest.skip(f"ViT teacher or Fashion-MNIST not found under {shared_data_dir()}")
    return weights


@pytest.fixture(scope="module")
def vit_teacher(vit_weights):
    return load_teacher(None, vit_weights)


@pytest.fixture(scope="module")
def test_images(vit_teacher):
    from zsq.data import load_dataset
    from zsq.data.datasets import head

    _, meta = vit_teacher
    spec = f"fashion-mnist:{shared_data_dir() / 'fashion-mnist'}"
    dataset = load_dataset(
        spec, normalize_mean=meta.normalize_mean, normalize_std=meta.normalize_std
    )
    return head(dataset, N_IMAGES)


@pytest.fixture(scope="module")
def float_top1(vit_teacher, test_images):
    from zsq.evaluate import evaluate

    return evaluate(vit_teacher[0], test_images, device="cpu", progress=False).top1


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- building timm models ----------------------------------------------------------------------


def test_timm_name_builds_with_kwargs_and_explicit_counts_win():
    assert is_timm_name(" timm:vit_tiny_patch16_224") and not is_timm_name("resnet20")
    model = create_model(VIT, model_kwargs={**SMALL, "num_classes": 7, "in_chans": 1})
    assert model.head.out_features == 7 and model.patch_embed.proj.in_channels == 1
    assert model.pos_embed.shape == (1, (16 // 4) ** 2 + 1, 32)
    model = create_model(VIT, 5, 2, model_kwargs={**SMALL, "num_classes": 7})
    assert model.head.out_features == 5 and model.patch_embed.proj.in_channels == 2
    assert create_model(VIT, model_kwargs=SMALL).head.out_features == 10  # zsq's default


def test_pretrained_is_never_requested(caplog):
    with caplog.at_level(logging.WARNING):
        create_model(VIT, model_kwargs={**SMALL, "pretrained": True})  # offline: would fail
    assert "pretrained" in caplog.text


def test_unknown_timm_name_is_one_line():
    with pytest.raises(ZsqError) as err:
        create_model("timm:not_a_model")
    message = _one_line(err)
    assert "'not_a_model'" in message and "timm.list_models('*vit*')" in message


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(ZsqError) as err:
        create_model(VIT, model_kwargs=SMALL)
    assert "pip install 'zsq[vit]'" in _one_line(err)


def test_kwargs_timm_rejects_are_one_line():
    with pytest.raises(ZsqError) as err:
        create_model(VIT, model_kwargs={**SMALL, "embed_dim": 30, "num_heads": 4})
    assert "model_kwargs" in _one_line(err)


def test_model_kwargs_reach_other_factories():
    assert create_model("resnet20", model_kwargs={"num_classes": 4}).linear.out_features == 4
    with pytest.raises(ZsqError) as err:
        create_model("resnet20", model_kwargs={"depth": 3})
    assert "depth" in _one_line(err)


# --- sidecar -----------------------------------------------------------------------------------


def test_sidecar_model_and_kwargs(tmp_path):
    weights = tmp_path / "vit.safetensors"
    sidecar = {"model": VIT, "model_kwargs": {**SMALL, "num_classes": 3, "in_chans": 1}}
    weights.with_suffix(".json").write_text(json.dumps(sidecar))
    meta = read_sidecar(weights)
    # model_kwargs stand in for the missing top-level fields
    assert meta == ModelMeta(num_classes=3, in_channels=1, image_size=16)
    assert meta.model == VIT and meta.model_kwargs["embed_dim"] == 32
    weights.with_suffix(".json").write_text(json.dumps({"model_kwargs": [1, 2]}))
    with pytest.raises(ZsqError, match="model_kwargs"):
        read_sidecar(weights)


def test_load_teacher_needs_a_name_from_somewhere(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "vit.safetensors"
    save_file(create_model(VIT, model_kwargs=SMALL).state_dict(), weights)
    with pytest.raises(ZsqError) as err:
        load_teacher(None, weights)
    assert "give model NAME" in _one_line(err)  # the CLI spells it --model
    model, meta = load_teacher(VIT, weights, model_kwargs=SMALL)  # all from the arguments
    assert meta.image_size == 16 and meta.model == VIT and not model.training


# --- the Fashion-MNIST ViT teacher -------------------------------------------------------------


def test_sidecar_teacher_builds_from_its_sidecar(vit_teacher, vit_weights):
    model, meta = vit_teacher
    assert meta.model == VIT and meta.image_size == 28 and meta.in_channels == 1
    assert meta.normalize_mean == (0.286,) and meta.normalize_std == (0.353,)
    assert 200_000 < sum(p.numel() for p in model.parameters()) < 210_000
    named, _ = load_teacher(VIT, vit_weights)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(named(x), model(x))


def test_sidecar_teacher_top1(float_top1):
    assert abs(float_top1 - TEACHER_TOP1) <= 1.5


def test_sidecar_kwargs_that_do_not_fit_the_weights(vit_weights, tmp_path):
    weights = tmp_path / vit_weights.name
    shutil.copy(vit_weights, weights)
    sidecar = json.loads(vit_weights.with_suffix(".json").read_text())
    sidecar["model_kwargs"]["embed_dim"] = 32
    weights.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(ZsqError) as err:
        load_teacher(None, weights)
    message = _one_line(err)
    assert "'cls_token'" in message and "model_kwargs" in message


@pytest.mark.parametrize(
    "wbits, abits",
    [
        (8, 8),
        pytest.param(4, 8, marks=pytest.mark.slow),
        pytest.param(4, 4, marks=pytest.mark.slow),
    ],
)
def test_minmax_vit_on_gaussian_calibration(vit_teacher, test_images, float_top1, wbits, abits):
    """Min/max weights, activations observed on 256 N(0, 1) images (data-free); W8A8 must stay
    within 2 points of float. W4A8 / W4A4 only run (slow): 88.40 / 81.15 when written, float
    88.40, on the first 2000 test images."""
    from zsq.evaluate import evaluate
    from zsq.ptq.minmax import calibrate_activations, gaussian_batches
    from zsq.quant import QuantAttention, QuantSpec, quantize_model

    teacher, meta = vit_teacher
    student = quantize_model(teacher, QuantSpec(wbits=wbits, abits=abits), (1, 28, 28))
    assert sum(isinstance(m, QuantAttention) for m in student.modules()) == 4
    calibrate_activations(student, gaussian_batches(256, (1, meta.image_size, meta.image_size)))
    top1 = evaluate(student, test_images, device="cpu", progress=False).top1
    logging.getLogger(__name__).info(
        "W%sA%s top-1 %.2f (float %.2f)", wbits, abits, top1, float_top1
    )
    if (wbits, abits) == (8, 8):
        assert top1 >= float_top1 - 2.0
    else:
        assert 0.0 <= top1 <= 100.0
