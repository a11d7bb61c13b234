"""The quantizer against hand-computed codes (paper Eq. 1-4) and the module swap."""

import pytest
import torch
import torchvision
from torch import nn

from zsq.errors import ZsqError
from zsq.quant import (
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    act_quantizers,
    code_range,
    fake_quantize,
    parse_bits,
    parse_override,
    quant_layers,
    quant_params,
    quantize_model,
    quantize_tensor,
    set_observing,
)
from zsq.quant.quantizer import MIN_RANGE


def test_per_tensor_2bit_exact_grid():
    # min 0, max 1.5: S = 3/1.5 = 2, z = round(0) + 2 = 2, q = round(2x - 2)
    qt = quantize_tensor(torch.tensor([0.0, 0.5, 1.0, 1.5]), bits=2, channel_axis=None)
    assert qt.scale.item() == 2.0 and qt.zero_point.item() == 2.0
    assert qt.codes.tolist() == [-2, -1, 0, 1]
    assert qt.dequantize().tolist() == [0.0, 0.5, 1.0, 1.5]


def test_negative_only_range_3bit():
    # S = 7/3, z = round(-28/3) + 4 = -9 + 4 = -5; q = round(S*x + 5) = round(-4.33, -2, 2.67)
    qt = quantize_tensor(torch.tensor([-4.0, -3.0, -1.0]), bits=3, channel_axis=None)
    assert qt.zero_point.item() == -5.0
    assert qt.codes.tolist() == [-4, -2, 3]
    # dequantized (q + z) / S = (-9, -7, -2) * 3/7: the min itself is not exactly representable
    expected = torch.tensor([-9.0, -7.0, -2.0]) * 3 / 7
    torch.testing.assert_close(qt.dequantize(), expected)


def test_per_channel_4bit_with_clamp():
    w = torch.tensor([[0.0, 1.0, 15.0], [-2.0, 0.0, 2.0]])
    qt = quantize_tensor(w, bits=4, channel_axis=0)
    # row 0: S = 1, z = 8 -> q = x - 8.  row 1: S = 15/4, z = round(-7.5) + 8 = 0,
    # q = round(3.75 * x) = (-8, 0, 8) with ties to even, then clamped to 7.
    assert qt.scale.flatten().tolist() == [1.0, 3.75]
    assert qt.zero_point.flatten().tolist() == [8.0, 0.0]
    assert qt.codes.tolist() == [[-8, -7, 7], [-8, 0, 7]]


@pytest.mark.parametrize(
    "value, code, zero_point", [(3.0, 7, 8.0), (-2.0, -8, -7.0), (0.0, -8, 8.0)]
)
def test_constant_tensor_keeps_value(value, code, zero_point):
    # a constant c gets the range [min(c, 0), max(c, 0)]: c=3 -> S=5, z=8, q=round(15-8)=7;
    # c=-2 -> S=7.5, z=round(-15)+8=-7, q=-8; c=0 -> width 1e-8, z=8, q=-8
    qt = quantize_tensor(torch.full((5,), value), bits=4, channel_axis=None)
    assert qt.codes.tolist() == [code] * 5
    assert qt.zero_point.item() == zero_point
    torch.testing.assert_close(qt.dequantize(), torch.full((5,), value))


def test_symmetric_option():
    qt = quantize_tensor(torch.tensor([-1.0, 0.5, 1.0]), bits=4, channel_axis=None, symmetric=True)
    assert qt.zero_point.item() == 0.0 and qt.scale.item() == 7.0
    assert qt.codes.tolist() == [-7, 4, 7]  # 3.5 rounds to even


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("axis", [None, 0])
def test_codes_are_integers_in_signed_range(bits, axis):
    x = torch.randn(16, 3, 3, 3, generator=torch.Generator().manual_seed(bits)) * 3 - 1
    qt = quantize_tensor(x, bits=bits, channel_axis=axis)
    lo, hi = code_range(bits)
    assert qt.codes.min() >= lo and qt.codes.max() <= hi
    assert torch.equal(qt.codes, qt.codes.round())
    # every channel (or the tensor) uses the full grid: its min maps to lo, its max to hi
    assert qt.codes.min() == lo and qt.codes.max() == hi
    step = 1 / qt.scale
    assert (qt.dequantize() - x).abs().le(step * 0.5 + 1e-5).all()


def test_ste_gradient_is_identity():
    x = torch.randn(4, 5, requires_grad=True)
    qt = quantize_tensor(x.detach(), bits=3, channel_axis=None)
    y = fake_quantize(x, qt.scale, qt.zero_point, 3)
    upstream = torch.randn(4, 5)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)
    torch.testing.assert_close(y.detach(), qt.dequantize())


def test_bits_out_of_range_is_user_error():
    with pytest.raises(ZsqError, match="out of range"):
        QuantSpec(wbits=9)
    with pytest.raises(ZsqError, match="out of range"):
        quantize_tensor(torch.ones(3), bits=1)
    with pytest.raises(ZsqError, match="'off' is not an integer; .* or None for full precision"):
        QuantSpec(wbits="off")
    assert parse_bits("off") is None and parse_bits("5") == 5
    with pytest.raises(ZsqError):
        parse_bits("four")


def test_act_quantizer_ema_and_freeze():
    aq = ActQuantizer(bits=8, observer="ema", momentum=0.9)
    aq(torch.tensor([-1.0, 2.0]))  # first batch initialises
    assert (aq.x_min.item(), aq.x_max.item()) == (-1.0, 2.0)
    aq(torch.tensor([-3.0, 4.0]))
    assert aq.x_min.item() == pytest.approx(0.9 * -1 + 0.1 * -3)
    assert aq.x_max.item() == pytest.approx(0.9 * 2 + 0.1 * 4)
    aq.observing = False
    aq(torch.tensor([-100.0, 100.0]))
    assert aq.x_max.item() == pytest.approx(2.2)


def test_act_quantizer_running_minmax():
    aq = ActQuantizer(bits=4, observer="minmax")
    for batch in ([0.0, 1.0], [-2.0, 0.5], [0.1, 0.2]):
        aq(torch.tensor(batch))
    assert (aq.x_min.item(), aq.x_max.item()) == (-2.0, 1.0)
    assert int(aq.num_observed) == 3


def test_freezing_unobserved_ranges_is_an_error():
    student = quantize_model(nn.Sequential(nn.Linear(3, 2)), QuantSpec(act_placement="input"))
    with pytest.raises(ZsqError, match="never saw data"):
        set_observing(student, False)


def _count(model):
    return sum(1 for _ in quant_layers(model)), sum(1 for _ in act_quantizers(model))


@pytest.mark.parametrize(
    "factory, n_layers, n_relu",
    [
        (lambda: torchvision.models.resnet18(), 21, 9),
        (lambda: torchvision.models.mobilenet_v2(), 53, 35),
        (lambda: torchvision.models.resnet50(), 54, 17),
    ],
)
def test_module_swap_counts_torchvision(factory, n_layers, n_relu):
    model = factory()
    student = quantize_model(model, QuantSpec(act_placement="input"))
    assert _count(student) == (n_layers, n_layers)
    reference = quantize_model(model, QuantSpec(act_placement="reference"))
    assert _count(reference)[0] == n_layers
    # torchvision resnet reuses one ReLU module per block (stem + 8): each module is wrapped once,
    # so its two call sites share one range (documented; the input placement avoids it)
    assert _count(reference)[1] == n_relu
    assert not any(isinstance(m, QuantConv2d) for m in model.modules())  # teacher untouched
    x = torch.randn(2, 3, 64, 64)
    model.eval(), student.eval()
    assert student(x).shape == model(x).shape


def test_module_swap_cifar_resnet20_and_overrides():
    from zsq.models import create_model

    model = create_model("resnet20")
    spec = QuantSpec(
        wbits=4,
        abits=4,
        overrides={"conv1": {"wbits": 8}, "linear": {"wbits": None, "abits": None}},
    )
    student = quantize_model(model, spec, (3, 32, 32))
    layers = dict(quant_layers(student))
    assert len(layers) == 20
    assert layers["conv1"].wbits == 8 and layers["linear"].wbits is None
    assert layers["linear"].act_quant is None
    assert layers["layer1.0.conv1"].wbits == 4
    assert isinstance(layers["linear"], QuantLinear)
    ref = quantize_model(model, QuantSpec(act_placement="reference"))
    assert _count(ref) == (20, 19)  # stem ReLU + two per basic block
    assert parse_override("layer1.*=4/8") == ("layer1.*", {"wbits": 4, "abits": 8})


def test_quantizes_nothing_only_when_no_width_is_set_anywhere():
    assert QuantSpec(wbits=None, abits=None).quantizes_nothing()
    assert QuantSpec(wbits=None, abits=None, overrides={"fc": {"wbits": None}}).quantizes_nothing()
    assert not QuantSpec(wbits=None, abits=None, overrides={"fc": {"abits": 8}}).quantizes_nothing()
    assert not QuantSpec(wbits=4, abits=None).quantizes_nothing()
    assert not QuantSpec(wbits=None, abits=2).quantizes_nothing()


@pytest.mark.parametrize("placement", ["reference", "input"])
def test_quantizers_are_made_on_the_models_device(placement):
    """A teacher on another device (here 'meta', as CUDA would be) gets a student wholly there,
    the new activation quantizers' buffers included."""
    from zsq.models import create_model

    model = create_model("resnet20").to("meta")
    student = quantize_model(model, QuantSpec(wbits=4, abits=4, act_placement=placement))
    tensors = [*student.parameters(), *student.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}


def test_user_module_and_no_layers_error():
    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.ModuleDict({"a": nn.Conv2d(1, 4, 3), "b": nn.Linear(4, 3)})

        def forward(self, x):
            x = torch.relu(self.body["a"](x)).mean((2, 3))
            return self.body["b"](x)

    student = quantize_model(Mine(), QuantSpec(wbits=3, abits=None))
    assert _count(student) == (2, 0)
    assert student(torch.randn(2, 1, 5, 5)).shape == (2, 3)
    with pytest.raises(ZsqError, match="no nn.Conv2d or nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), QuantSpec(), (1, 5, 5))


def test_weight_fake_quant_matches_codes_and_quant_params():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    q = QuantConv2d.from_float(conv, wbits=4)
    qt = q.quantized_weight()
    torch.testing.assert_close(q.fake_quant_weight(), qt.dequantize())
    student = quantize_model(
        nn.Sequential(conv), QuantSpec(wbits=4, abits=4, act_placement="input")
    )
    student(torch.randn(2, 2, 5, 5))
    params = quant_params(student)
    assert len(params["layers"]["0"]["weight_scale"]) == 3
    assert params["activations"]["0.act_quant"]["abits"] == 4


def test_an_unobserved_frozen_activation_quantizer_maps_inputs_to_zero() -> None:
    """As its docstring says: the range starts at [0, 0] until a batch is observed."""
    quantizer = ActQuantizer(4)
    quantizer.observing = False
    out = quantizer(torch.tensor([-1.0, 0.5, 2.0]))  # the degenerate range [0, MIN_RANGE]
    assert out.min() >= 0 and out.max() <= MIN_RANGE
    quantizer.observing = True
    x = torch.tensor([-1.0, 0.5, 2.0])
    assert torch.allclose(quantizer(x), x, atol=0.1)  # one observed batch sets the range
