import logging

import numpy as np
import pytest
import torch
from torch import nn

from zsq.errors import ZsqError
from zsq.mixed.cost import (
    Budget,
    LayerCost,
    budget_limit,
    budget_of_uniform,
    cost_table,
    layer_cost,
    layer_costs,
    parse_budget,
    total_cost,
)
from zsq.models import create_model
from zsq.quant import QuantSpec, act_quantizers, quant_layers, quantize_model


def two_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 10))


# By hand, for two_layer() on a 3x8x8 input:
#   conv: weight 4x3x3x3 = 108 elements, output 4x8x8 = 256 elements, each 3*3*3 = 27 MACs
#         -> 256 * 27 = 6912 MACs; 4 output channels
#   linear: weight 10x256 = 2560 elements, output 10 elements, each 256 MACs -> 2560 MACs;
#         10 output channels
#   per-channel parameters: scale + range min + range max (float32) + zero point (int16)
#         = 4 + 4 + 4 + 2 = 14 bytes per channel -> conv 56, linear 140
CONV_PARAMS, CONV_MACS, CONV_CH = 4 * 3 * 3 * 3, (4 * 8 * 8) * (3 * 3 * 3), 4
LIN_PARAMS, LIN_MACS, LIN_CH = 10 * 256, 10 * 256, 10
# 3 bits: packed two codes per byte -> conv ceil(108 / 2) = 54, linear 2560 / 2 = 1280
CONV_W3 = 54 + 4 * 14  # 110
LIN_W3 = 1280 + 10 * 14  # 1420
# 8 bits: one byte per code -> conv 108, linear 2560
CONV_W8 = 108 + 4 * 14  # 164
LIN_W8 = 2560 + 10 * 14  # 2700
# W4A8: 4 * 8 = 32 bit operations per MAC
CONV_BOPS_W4A8 = 32 * 6912  # 221184
LIN_BOPS_W4A8 = 32 * 2560  # 81920


def test_layer_costs_of_a_two_layer_model():
    costs = layer_costs(two_layer(), (3, 8, 8))
    assert costs == [
        LayerCost("0", CONV_PARAMS, CONV_MACS, CONV_CH),
        LayerCost("2", LIN_PARAMS, LIN_MACS, LIN_CH),
    ]
    assert (CONV_MACS, LIN_MACS) == (6912, 2560)


def test_size_and_bops_by_hand():
    conv, lin = layer_costs(two_layer(), (3, 8, 8))
    assert layer_cost(conv, "size", 3, 4) == CONV_W3 == 110
    assert layer_cost(lin, "size", 3, 4) == LIN_W3 == 1420
    assert layer_cost(conv, "size", 8, 4) == CONV_W8 == 164
    assert layer_cost(lin, "size", 8, None) == LIN_W8 == 2700
    assert layer_cost(conv, "bops", 4, 8) == CONV_BOPS_W4A8 == 221184
    assert layer_cost(lin, "bops", 4, 8) == LIN_BOPS_W4A8 == 81920
    assert layer_cost(lin, "bops", 4, None) == 4 * 32 * 2560  # full-precision activations
    assert layer_cost(conv, "wbits", 3, None) == 3 * 108
    costs = [conv, lin]
    assert total_cost(costs, "size", [3, 8], [4, 4]) == CONV_W3 + LIN_W8
    assert total_cost(costs, "bops", [4, 4], [8, 8]) == 303104
    assert budget_of_uniform(costs, "size", 3, 4) == 1530
    assert budget_of_uniform(costs, "size", 8, 4) == 2864
    assert budget_of_uniform(costs, "bops", 4, 8) == 303104
    assert budget_of_uniform(costs, "wbits", 4, 8) == 4.0


def test_layer_cost_accepts_numpy_ints_and_rejects_bad_widths():
    conv = LayerCost("c", 108, 6912, 4)
    assert layer_cost(conv, "size", np.int64(3), np.int64(4)) == 110
    for kind, w, a in (("size", 9, 4), ("bops", 4, 1), ("size", None, 4), ("speed", 4, 4)):
        with pytest.raises(ZsqError):
            layer_cost(conv, kind, w, a)
    with pytest.raises(ZsqError, match="2 weight and 1 activation"):
        total_cost([conv], "size", [3, 4], [4])


def test_parse_budget_forms():
    cases = {
        "size=1.2MB": ("size", 1.2e6),
        "size=512kB": ("size", 512_000),
        "size=1GB": ("size", 1e9),
        "size=100B": ("size", 100),
        "size=2KiB": ("size", 2048),
        "size=1.5MiB": ("size", 1.5 * 1024**2),
        " size = 3000 ": ("size", 3000),
        "bops=1.5G": ("bops", 1.5e9),
        "bops=2000": ("bops", 2000),
        "bops=4k": ("bops", 4000),
        "bops=2.5M": ("bops", 2.5e6),
        "bops=3T": ("bops", 3e12),
        "bops=1e9": ("bops", 1e9),
        "wbits=4.0": ("wbits", 4.0),
        "wbits=2": ("wbits", 2.0),
        "wbits=8": ("wbits", 8.0),
        "WBITS=3.5": ("wbits", 3.5),
    }
    for text, (kind, value) in cases.items():
        budget = parse_budget(text)
        assert budget.kind == kind and budget.value == pytest.approx(value, rel=1e-15), text
        assert budget.text == text.strip()


@pytest.mark.parametrize(
    "text",
    ["", "4", "size", "size=", "size=1.2XB", "bops=1.5GB", "wbits=4k",
     "size=-1MB", "size=0MB", "speed=3", "size=1.2MB,bops=3G"],
)  # fmt: skip
def test_parse_budget_errors_name_the_three_forms(text):
    with pytest.raises(ZsqError) as info:
        parse_budget(text)
    message = str(info.value)
    assert "\n" not in message
    assert "size=1.2MB" in message and "bops=1.5G" in message and "wbits=4.0" in message


@pytest.mark.parametrize("text", ["wbits=9", "wbits=1.5"])
def test_a_mean_width_out_of_range_says_so(text):
    with pytest.raises(ZsqError, match="mean weight width must be 2 to 8 bits"):
        parse_budget(text)


def test_budget_limit():
    costs = [LayerCost("a", 108, 1, 4), LayerCost("b", 2560, 1, 10)]
    assert budget_limit(parse_budget("wbits=4.0"), costs) == 4.0 * (108 + 2560) == 10672
    assert budget_limit(parse_budget("wbits=3.5"), costs) == 3.5 * 2668
    assert budget_limit(parse_budget("size=1.2MB"), costs) == pytest.approx(1.2e6)
    assert budget_limit(parse_budget("bops=1.5G"), costs) == pytest.approx(1.5e9)
    # uniform W4 meets its own wbits budget exactly
    limit = budget_limit(Budget("wbits", 4.0, "wbits=4"), costs)
    assert total_cost(costs, "wbits", [4, 4], [None, None]) == limit


def test_cost_table_rows_and_totals():
    costs = layer_costs(two_layer(), (3, 8, 8))
    table = cost_table(costs, abits=8)
    lines = table.splitlines()
    # W2 and W4 bytes equal W3's (all packed): 110 / 1420; W8: 164 / 2700
    assert "| 0 | 108 | 6912 | 110 | 110 | 164 | 221184 |" in lines
    assert "| 2 | 2560 | 2560 | 1420 | 1420 | 2700 | 81920 |" in lines
    assert "| **total** | 2668 | 9472 | 1530 | 1530 | 2864 | 303104 |" in lines
    # uniform totals, 2..8 bits: W3 1530 bytes, BOPs 3 * 8 * 9472; W5 one byte per code
    assert "| W3 | 3.00 | 1530 | 0.0015 | 227328 |" in lines
    assert "| W5 | 5.00 | 2864 | 0.0029 | 378880 |" in lines
    assert sum(line.startswith("| W") for line in lines) == 7
    per_layer, totals = table.split("\n\n")
    for part, columns in ((per_layer, 7), (totals, 5)):
        assert {line.count("|") for line in part.splitlines()} == {columns + 1}


def test_layer_costs_of_a_quantized_student_leave_its_state_alone():
    teacher = two_layer()
    student = quantize_model(teacher, QuantSpec(wbits=4, abits=4, act_placement="input"))
    student.train()
    rng = torch.get_rng_state()
    costs = layer_costs(student, (3, 8, 8))
    assert costs == layer_costs(teacher, (3, 8, 8))
    assert [c.name for c in costs] == [name for name, _ in quant_layers(student)]
    assert torch.equal(rng, torch.get_rng_state())
    assert all(m.training for m in student.modules())
    assert len(list(act_quantizers(student))) == 2
    assert all(int(aq.num_observed) == 0 and aq.observing for _, aq in act_quantizers(student))


class WithUnusedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2, groups=1, bias=False)
        self.grouped = nn.Conv2d(2, 4, (1, 3), groups=2)
        self.spare = nn.Linear(5, 5)

    def forward(self, x):
        return self.grouped(self.conv(x))


def test_grouped_conv_and_an_uncalled_layer(caplog):
    with caplog.at_level(logging.WARNING, logger="zsq.mixed.cost"):
        costs = layer_costs(WithUnusedHead(), (1, 9, 9))
    # conv: output 2x4x4 = 32 elements x 1*3*3 = 288; grouped: output 4x4x2 = 32 x (2/2)*1*3 = 96
    assert costs == [
        LayerCost("conv", 18, 288, 2),
        LayerCost("grouped", 12, 96, 4),
        LayerCost("spare", 25, 0, 5),
    ]
    assert "spare" in caplog.text


def test_bad_shape_and_failing_forward():
    with pytest.raises(ZsqError, match="three positive integers"):
        layer_costs(two_layer(), (8, 8))
    with pytest.raises(ZsqError, match="forward failed on a 1x3x16x16 input"):
        layer_costs(two_layer(), (3, 16, 16))


def resnet20_macs() -> int:
    """From the architecture: 3x3 convs, widths 16/32/64 at 32/16/8 pixels, 3 blocks a stage."""
    total = 32 * 32 * 16 * (3 * 9)  # stem
    in_ch = 16
    for width, side in ((16, 32), (32, 16), (64, 8)):
        for _ in range(3):
            total += side * side * width * (in_ch * 9)  # conv1 of the block (strided at entry)
            total += side * side * width * (width * 9)  # conv2
            in_ch = width
    return total + 10 * 64  # linear


def test_resnet20_costs():
    costs = layer_costs(create_model("resnet20", num_classes=10, in_channels=3), (3, 32, 32))
    assert len(costs) == 20
    assert costs[0] == LayerCost("conv1", 16 * 3 * 9, 32 * 32 * 16 * 3 * 9, 16)
    assert costs[-1] == LayerCost("linear", 640, 640, 10)
    assert costs[1].name == "layer1.0.conv1"
    assert sum(c.macs for c in costs) == resnet20_macs() == 40_551_040
    assert sum(
        c.params for c in costs
    ) == 16 * 27 + 6 * 16 * 16 * 9 + 32 * 16 * 9 + 5 * 32 * 32 * 9 + (
        64 * 32 * 9 + 5 * 64 * 64 * 9 + 640
    )
