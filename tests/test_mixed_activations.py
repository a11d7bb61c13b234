"""Mixed activation widths under a BOPs budget: sites, groups, the exact joint solve."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from tests._teachers import tiny_teacher
from torch import nn

from zsq.errors import ZsqError
from zsq.mixed.activations import (
    Site,
    build_groups,
    group_costs,
    group_scores,
    padded,
    site_sensitivities,
    sites_of,
)
from zsq.mixed.allocate import MixedConfig, allocate
from zsq.mixed.cost import LayerCost, layer_costs, total_cost
from zsq.mixed.solver import solve_allocation
from zsq.models import create_model
from zsq.numerics.losses import kl_to_teacher
from zsq.quant import QuantSpec, act_quantizers, quant_layers, quantize_model, set_observing

CHOICES = (2, 4, 8)


class Shared(nn.Module):
    """A ReLU output read by two convs (a block input feeding conv1 and a 1x1 downsample)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu(self.stem(x))
        x = self.relu2(self.conv1(x) + self.down(x))
        return self.fc(x.mean((2, 3)))


def test_resnet20_sites_follow_the_blocks():
    """Reference placement: each quantized ReLU feeds the next conv; the stem conv reads the
    float image and the classifier a pooled feature, so they are fed by no site."""
    model = create_model("resnet20", num_classes=10)
    sites = sites_of(model, QuantSpec(), (3, 32, 32))
    names = [name for name, _ in quant_layers(quantize_model(model, QuantSpec(), (3, 32, 32)))]
    fed = {names[i]: site.name for site in sites for i in site.consumers}
    assert all(len(site.consumers) == 1 for site in sites) and len(sites) == 18
    assert fed["layer1.0.conv1"] == "relu" and fed["layer1.0.conv2"] == "layer1.0.relu1"
    assert fed["layer1.1.conv1"] == "layer1.0.relu2" and fed["layer3.2.conv2"] == "layer3.2.relu1"
    assert "conv1" not in fed and "linear" not in fed and len(fed) == 18


def test_shared_site_and_input_placement():
    model = Shared()
    sites = sites_of(model, QuantSpec(), (3, 6, 6))
    assert sites == [Site("relu", (1, 2))]  # conv1 and down read the same quantized ReLU
    groups = build_groups(sites, 4, CHOICES, (4, 8))
    assert [g.layers for g in groups] == [(1, 2), (0,), (3,)]
    assert len(groups[0].options) == 2 * 3 * 3 and len(groups[1].options) == 3
    own = sites_of(model, QuantSpec(act_placement="input"), (3, 6, 6))
    assert own == [Site(n, (i,)) for i, n in enumerate(["stem", "conv1", "down", "fc"])]


def test_joint_solve_equals_brute_force_with_a_shared_site():
    """Random sensitivities on the shared-site model: the padded group solve is the optimum of
    every weight x activation assignment with the site's width common to its two readers."""
    rng = random.Random(0)
    costs = [LayerCost(n, 10, macs, 4) for n, macs in [("a", 50), ("b", 80), ("c", 20), ("d", 7)]]
    sites = [Site("s", (1, 2))]
    wch, ach = (2, 4, 8), (4, 8)
    w_scores = [[rng.random() / b for b in wch] for _ in costs]
    s_scores = {"s": [rng.random(), rng.random() / 3]}
    groups = build_groups(sites, 4, wch, ach)
    table = group_costs(groups, costs, "bops", 4)
    scores = group_scores(groups, w_scores, s_scores, wch, ach)
    for limit in (2000.0, 3500.0, 6000.0):
        picked = solve_allocation(padded(scores), padded(table), limit)
        got = sum(row[min(k, len(row) - 1)] for row, k in zip(scores, picked, strict=True))
        best = min(
            sum(w_scores[i][wch.index(w[i])] for i in range(4)) + s_scores["s"][ach.index(a)]
            for w in itertools.product(wch, repeat=4)
            for a in ach
            if total_cost(costs, "bops", list(w), [4, a, a, 4]) <= limit
        )
        assert got == pytest.approx(best, rel=1e-9)


def test_site_sensitivity_is_the_kl_with_only_that_site_quantized():
    teacher = tiny_teacher()
    images = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec()
    sites = sites_of(teacher, spec, (3, 8, 8))
    assert [s.name for s in sites] == ["2"]  # the first ReLU feeds conv "3"; "5" feeds a pool
    scores = site_sensitivities(teacher, spec, sites, CHOICES, images, progress=False)
    with torch.no_grad():
        target = teacher(images)
        for bits, score in zip(CHOICES, scores["2"], strict=True):
            only = QuantSpec(wbits=None, abits=None, overrides={"2": {"abits": bits}})
            model = quantize_model(teacher, replace_observer(only), (3, 8, 8)).eval()
            model(images)
            set_observing(model, False)
            direct = float(kl_to_teacher(model(images), target, 1.0, "batchmean"))
            assert score == pytest.approx(direct, rel=1e-5, abs=1e-9)
    assert scores["2"][0] > scores["2"][-1] >= 0


def replace_observer(spec: QuantSpec) -> QuantSpec:
    from dataclasses import replace

    return replace(spec, act_observer="minmax")


def test_allocation_sets_each_sites_width_and_meets_the_bops_budget():
    model = Shared()
    images = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    costs = layer_costs(model, (3, 6, 6))
    uniform = total_cost(costs, "bops", [4] * 4, [4] * 4)
    allocation = allocate(
        model,
        image_shape=(3, 6, 6),
        budget=f"bops={uniform}",
        images=images,
        choices=CHOICES,
        act_choices=(2, 4, 8),
        progress=False,
    )
    assert allocation.act_sites == ["relu"] and allocation.cost <= allocation.limit == uniform
    student = quantize_model(model, allocation.apply(QuantSpec(wbits=4, abits=4)), (3, 6, 6))
    quantizers = dict(act_quantizers(student))
    assert quantizers["relu.act_quant"].bits == allocation.act_bits[0]
    layers = dict(quant_layers(student))
    assert [layers[n].wbits for n in allocation.layers] == allocation.wbits
    a = allocation.act_bits[0]  # stem and fc stay at --abits
    recomputed = total_cost(costs, "bops", allocation.wbits, [4, a, a, 4])
    assert recomputed == pytest.approx(allocation.cost) and recomputed <= uniform


def test_defaults_and_refusals():
    cfg = MixedConfig(budget="bops=1G", choices="2,4,8")
    assert cfg.act_choices == (2, 4, 8)  # mixed when the budget is BOPs
    assert MixedConfig(budget="bops=1G", act_choices="off").act_choices is None
    assert MixedConfig(budget="wbits=4").act_choices is None
    assert MixedConfig(budget="bops=1G", allocator="hessian").act_choices is None
    with pytest.raises(ZsqError, match="bops= budget only"):
        MixedConfig(budget="wbits=4", act_choices="4,8")
    with pytest.raises(ZsqError, match="needs the sensitivity allocator"):
        MixedConfig(budget="bops=1G", allocator="hessian", act_choices="4,8")


def test_too_many_joint_choices_is_refused():
    with pytest.raises(ZsqError, match="too many"):
        build_groups([Site("x", tuple(range(6)))], 6, (2, 3, 4, 5, 6, 8), (2, 3, 4, 5, 6, 8))
