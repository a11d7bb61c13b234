"""The ``auto`` activation placement: the reference's quantizers after ReLU modules where a
layer reads one, a quantizer at the layer's input elsewhere, the image in full precision."""

import json

import pytest
import torch
from torch import nn

import zsq
from zsq.errors import ConfigError
from zsq.methods import MinMax
from zsq.models import create_model, resnet20
from zsq.quant import QuantSpec, act_quantizers, quant_layers, quantize_model
from zsq.quant.placement import layer_inputs, resolve_placement


class SiluNet(nn.Module):
    """A user's network with no nn.ReLU: SiLU, a depthwise conv, a residual sum, BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.pointwise(torch.nn.functional.silu(self.bn(self.depthwise(x))))
        return self.head(x.mean((2, 3)))


class Mixed(nn.Module):
    """One layer after a ReLU through pooling and flatten, one after a residual sum, one after
    a functional relu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.after_relu = nn.Conv2d(4, 4, 1)
        self.after_sum = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        z = self.after_relu(torch.nn.functional.max_pool2d(y, 2))
        z = self.after_sum(z + torch.nn.functional.max_pool2d(y, 2))
        return self.head(torch.relu(z).flatten(2).mean(2))


def test_each_layer_is_traced_to_what_quantizes_its_input():
    assert layer_inputs(Mixed(), QuantSpec(), (3, 8, 8)) == {
        "conv": "image",
        "after_relu": "after relu",
        "after_sum": "input",  # a sum of a ReLU output and a conv output
        "head": "input",  # a functional relu: no module, no quantizer
    }


def test_a_relu_set_to_full_precision_covers_nothing():
    spec = QuantSpec(overrides={"relu": {"abits": None}})
    assert layer_inputs(Mixed(), spec, (3, 8, 8))["after_relu"] == "input"


def test_auto_on_the_cifar_resnet_is_the_reference_student():
    """Every ResNet-20 layer reads a ReLU output or the image: the same quantizers, the same
    outputs after the same calibration."""
    teacher = resnet20(num_classes=10).eval()
    auto = quantize_model(teacher, QuantSpec(), image_shape=(3, 32, 32))
    reference = quantize_model(teacher, QuantSpec(act_placement="reference"))
    assert resolve_placement(teacher, QuantSpec(), (3, 32, 32)).quantized_inputs == ()
    assert list(auto.state_dict()) == list(reference.state_dict())
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    for student in (auto, reference):
        student.train()
        student(x)
        student.eval()
    assert torch.equal(auto(x), reference(x))


def test_auto_needs_the_input_shape_only_when_activations_are_quantized():
    with pytest.raises(ConfigError, match="needs the model's input shape"):
        quantize_model(SiluNet(), QuantSpec(wbits=4, abits=4))
    quantize_model(SiluNet(), QuantSpec(wbits=4, abits=None))  # weights only: nothing to trace


def _every_input_quantized(model, image_shape, num_classes, tmp_path):
    result = zsq.quantize(
        model, MinMax(calib_size=8), image_shape=image_shape, num_classes=num_classes,
        device="cpu", progress=False, work_dir=tmp_path / "run",
    )  # fmt: skip
    places = json.loads((tmp_path / "run" / "quant.json").read_text())["input_placement"]
    quantized = {name for name, _ in act_quantizers(result.student)}
    layers = [name for name, _ in quant_layers(result.student)]
    assert sorted(places) == sorted(layers)
    for name in layers:
        place = places[name]
        assert place == "image" or place == "input" or place.startswith("after "), (name, place)
        if place == "input":
            assert f"{name}.act_quant" in quantized
        if place.startswith("after "):  # the ReLU modules named there are quantized
            for relu in place.removeprefix("after ").split(", "):
                assert f"{relu}.act_quant" in quantized, (name, relu)
    assert sum(place == "image" for place in places.values()) == 1  # the first layer only
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["quant_spec"]["act_placement"] == "auto"
    assert "activation placement | auto:" in (tmp_path / "run" / "report.md").read_text()
    return places


def test_a_silu_network_quantizes_every_layer_input_with_the_defaults(tmp_path):
    torch.manual_seed(0)
    places = _every_input_quantized(SiluNet().eval(), (3, 8, 8), 10, tmp_path)
    assert places["pointwise"] == "input" and places["head"] == "input"


def test_mobilenet_v3_small_quantizes_every_layer_input_with_the_defaults(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    places = _every_input_quantized(model, (3, 32, 32), 10, tmp_path)
    kinds = {p.split(" ")[0] for p in places.values()}
    assert kinds == {"image", "input", "after"}  # hardswish and ReLU both present


def test_a_timm_vit_quantizes_every_linear_input_with_the_defaults(tmp_path):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = create_model(
        "timm:vit_tiny_patch16_224",
        model_kwargs={"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1,
                      "num_heads": 2, "num_classes": 10},
    ).eval()  # fmt: skip
    places = _every_input_quantized(vit, (3, 8, 8), 10, tmp_path)
    assert places["patch_embed.proj"] == "image"
    assert all(places[n] == "input" for n in places if n != "patch_embed.proj")


def test_a_reference_run_resumes_under_auto_only_where_the_students_agree(tmp_path):
    from zsq.io import write_marker
    from zsq.run.record import (
        RECORD_VERSION,
        check_resumed_placement,
        differences,
    )

    saved = {"quant.act_placement": "reference"}
    write_marker(tmp_path, {"record_version": RECORD_VERSION, "options": saved, "sessions": []})
    assert differences(saved, {"quant.act_placement": "auto"}) == []  # the teacher decides
    current = {"quant.act_placement": "auto", "seed": 0}
    recorded = check_resumed_placement(tmp_path, tmp_path, QuantSpec(quantized_inputs=()), current)
    # recorded as it started, so that a later resume may name either placement
    assert recorded == {"quant.act_placement": "reference", "seed": 0}
    with pytest.raises(ConfigError, match="resume with act_placement reference"):
        check_resumed_placement(tmp_path, tmp_path, QuantSpec(quantized_inputs=("head",)), current)


class Aliases(nn.Module):
    """An op that returns its input unchanged, and an assignment into a ReLU output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.same = nn.Conv2d(4, 4, 1)
        self.cast = nn.Conv2d(4, 4, 1)
        self.mixed = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        a = self.same(y)
        b = self.cast(y.to(self.cast.weight))  # the same tensor back: y keeps its tag
        z = self.relu(self.conv(x))
        z[:, :2] = self.conv(x)[:, :2]  # now partly a conv output: not covered
        return a + b + self.mixed(z)


def test_ops_returning_their_input_and_assignments_keep_the_lineage_right():
    places = layer_inputs(Aliases(), QuantSpec(), (3, 8, 8))
    assert places["same"] == places["cast"] == "after relu"
    assert places["mixed"] == "input"
