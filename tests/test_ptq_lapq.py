"""LAPQ: each phase against exact or brute-force answers, and the student it returns."""

import numpy as np
import pytest
import torch
from tests._teachers import tiny_teacher
from torch import nn

from zsq.errors import ZsqError
from zsq.methods import LAPQ
from zsq.ptq import CalibrationSet, LapqConfig, lapq_quantize
from zsq.ptq.lapq import (
    Lapq,
    bias_correct,
    clip_errors,
    clip_quantize,
    lapq_spec,
    lp_optimal_clip,
    paper_full_precision_layers,
    quadratic_minimum,
    sequential_chain,
)
from zsq.quant import QuantSpec, quant_layers, quantize_model


def brute_force_clip(x, bits, p, kind, points=4000):
    top = float(x.max() if kind == "unsigned" else x.abs().max())
    grid = torch.linspace(top / points, top, points)
    return float(grid[clip_errors(x, grid, bits, kind, p).argmin()])


@pytest.mark.parametrize("distribution", ["gaussian", "laplace"])
@pytest.mark.parametrize(("bits", "p"), [(2, 2.0), (4, 2.0), (4, 3.0), (3, 4.0)])
def test_lp_optimal_clip_matches_a_brute_force_grid(distribution, bits, p):
    gen = torch.Generator().manual_seed(0)
    if distribution == "gaussian":
        x = torch.randn(50000, generator=gen)
    else:
        x = torch.distributions.Laplace(0.0, 1.0).sample((50000,))
    for kind, data in (("weight", x), ("unsigned", x.abs())):
        found = lp_optimal_clip(data, bits, p, kind)
        brute = brute_force_clip(data, bits, p, kind)
        assert abs(found - brute) / brute < 0.01, (kind, found, brute)


def test_clip_quantize_is_what_the_quantizer_does():
    x = torch.tensor([-2.0, -0.51, -0.1, 0.0, 0.26, 0.7, 3.0])
    # 2-bit symmetric weights, alpha 1: scale (2^1 - 1)/1 = 1, codes clamp(round(x), -2, 1)
    assert torch.equal(
        clip_quantize(x, torch.tensor(1.0), 2, "weight"),
        torch.tensor([-2.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0]),
    )
    # 2-bit unsigned, alpha 3: levels 0, 1, 2, 3
    assert torch.equal(
        clip_quantize(x.abs(), torch.tensor(3.0), 2, "unsigned"),
        torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, 1.0, 3.0]),
    )


def test_quadratic_fit_recovers_a_known_minimum():
    ps = np.linspace(2, 4, 10)
    assert quadratic_minimum(ps, 3 * (ps - 2.7) ** 2 + 1) == pytest.approx(2.7, abs=1e-9)
    assert quadratic_minimum(ps, (ps - 9.0) ** 2) == 4.0  # minimum outside: kept in the grid
    assert quadratic_minimum(ps, -((ps - 3) ** 2) + 0.01 * ps) == 2.0  # no minimum: grid's best


def test_bias_correction_zeroes_the_per_channel_mean_weight_error():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    student = quantize_model(
        nn.Sequential(conv), QuantSpec(wbits=3, abits=None, per_channel=False, w_symmetric=True)
    )
    layer = dict(quant_layers(student))["0"]
    layer.set_weight_range(-0.1, 0.1)
    before = (layer.fake_quant_weight() - layer.weight).flatten(1).mean(1)
    assert before.abs().max() > 1e-3
    bias_correct(layer)
    after = (layer.fake_quant_weight() - layer.weight).flatten(1).mean(1)
    assert after.abs().max() < 1e-7


def synthetic(teacher, n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return CalibrationSet(torch.randn(n, 3, 8, 8, generator=gen), None, "noise", real=False)


def test_powell_never_ends_worse_than_it_starts_and_the_report_has_every_phase():
    teacher = tiny_teacher()
    config = LapqConfig(maxfev=40, batch_size=8)
    student, report = lapq_quantize(
        teacher, QuantSpec(wbits=3, abits=3), synthetic(teacher), config, progress=False
    )
    assert report["loss_powell"] <= report["loss_powell_start"] == report["loss_quadratic"]
    assert report["loss_final"] == pytest.approx(report["loss_powell"])
    assert report["powell_evaluations"] <= 41
    assert min(report["p_grid"]) <= report["p"] <= max(report["p_grid"])
    assert set(report["seconds"]) == {"collect", "layer_wise", "p_search", "powell"}
    assert len(report["clips"]) == report["clipped_tensors"] == 3 + 2  # 3 layers, 2 ReLUs


def test_the_cached_chain_gives_the_uncached_loss_exactly():
    teacher = tiny_teacher()
    lapq = Lapq(
        teacher,
        QuantSpec(wbits=4, abits=4),
        synthetic(teacher),
        LapqConfig(batch_size=8),
        progress=False,
    )
    assert lapq._chain is not None
    clips = lapq.layerwise(2.0)
    lapq.set_clips(clips)
    cached = [lapq.loss()]
    for i in (4, 0, 2):  # change one clip at a time, late and early in the chain
        clips = clips.copy()
        clips[i] *= 0.8
        lapq.set_clips(clips)
        cached.append(lapq.loss())
    lapq._chain = None
    assert lapq.loss() == cached[-1]


def test_sequential_chain_refuses_a_model_whose_forward_is_not_its_children_in_order():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(x) + self.a(x)

    student = quantize_model(Skip(), QuantSpec(wbits=4, abits=4, act_placement="input"))
    assert sequential_chain(student, torch.randn(2, 4)) is None


def test_paper_policy_keeps_first_conv_last_conv_and_classifier_in_full_precision():
    from zsq.models import create_model

    model = create_model("resnet20")
    names = paper_full_precision_layers(model)
    assert names == ["conv1", "layer3.2.conv2", "linear"]
    spec = lapq_spec(QuantSpec(wbits=4, abits=4), model, "paper")
    student = quantize_model(model, spec, (3, 32, 32))
    bits = {name: layer.wbits for name, layer in quant_layers(student)}
    assert [n for n, b in bits.items() if b is None] == names
    assert spec.w_symmetric and not spec.per_channel


def test_real_labelled_data_uses_cross_entropy():
    teacher = tiny_teacher()
    data = synthetic(teacher)
    labelled = CalibrationSet(data.images, teacher(data.images).argmax(1), "real", real=True)
    lapq = Lapq(
        teacher, QuantSpec(wbits=8, abits=8), labelled, LapqConfig(batch_size=8), progress=False
    )
    lapq.set_clips(lapq.layerwise(2.0))
    logits = lapq.student(data.images)
    expected = nn.functional.cross_entropy(logits, labelled.labels).item()
    assert lapq.loss() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"layers": "nonsense"},
        {"stages": "powell"},
        {"p_grid": "2,3"},
        {"maxiter": 0},
        {"bias_correction": "maybe"},
        {"unknown": 1},
    ],
)
def test_bad_options_are_one_line_errors(options):
    with pytest.raises(ZsqError) as info:
        LAPQ.from_fields(options)
    assert "\n" not in str(info.value)
