"""Mixed precision end to end: the allocators' scores against direct computation, the exact
allocation, bits.json, and the CLI (budgets met, bad budgets refused cleanly)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch
from tests._teachers import tiny_teacher
from torch import nn

from zsq.errors import ZsqError
from zsq.mixed.allocate import (
    Allocation,
    allocate,
    hessian_scores,
    read_bits,
    sensitivity_scores,
    write_bits,
)
from zsq.mixed.cost import budget_limit, layer_cost, layer_costs, parse_budget
from zsq.numerics.losses import kl_to_teacher
from zsq.quant import QuantSpec, quant_layers, quantize_model

CHOICES = (2, 4, 8)


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


@pytest.fixture(scope="module")
def images():
    return torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.3


def test_sensitivity_is_the_kl_with_only_that_layer_quantized(teacher, images):
    scores = sensitivity_scores(teacher, QuantSpec(), CHOICES, images, progress=False)
    names = [n for n, _ in quant_layers(quantize_model(teacher, QuantSpec(), (3, 8, 8)))]
    assert len(scores) == len(names) == 3
    with torch.no_grad():
        target = teacher(images)
        for name, row in zip(names, scores, strict=True):
            for bits, score in zip(CHOICES, row, strict=True):
                only = QuantSpec(wbits=None, abits=None, overrides={name: {"wbits": bits}})
                model = quantize_model(teacher, only).eval()
                direct = float(kl_to_teacher(model(images), target, 1.0, "batchmean"))
                assert score == pytest.approx(direct, rel=1e-5, abs=1e-9)
            assert row[0] > row[-1] >= 0  # 2 bits hurt more than 8


def test_hessian_mean_diagonal_matches_the_exact_hessian(images):
    """A model small enough for the exact Hessian of the KL at the teacher (its Fisher)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    x = torch.randn(40, 3, 2, 2)
    _, means = hessian_scores(model, QuantSpec(), CHOICES, x, probes=3000, progress=False)
    weights = [model[1].weight, model[3].weight]
    with torch.no_grad():
        target = model(x)

    def loss_of(w1, w2):
        h = torch.tanh(x.flatten(1) @ w1.T + model[1].bias)
        return kl_to_teacher(h @ w2.T + model[3].bias, target, 1.0, "batchmean")

    exact = torch.autograd.functional.hessian(loss_of, tuple(w.detach() for w in weights))
    for i, w in enumerate(weights):
        block = exact[i][i].reshape(w.numel(), w.numel())
        expected = float(block.diagonal().mean())
        assert means[i] == pytest.approx(expected, rel=0.05)


def test_allocation_is_the_exact_optimum_and_within_budget(teacher, images):
    budget = parse_budget("wbits=4.0")
    alloc = allocate(
        teacher,
        image_shape=(3, 8, 8),
        budget=budget,
        allocator="sensitivity",
        choices=CHOICES,
        images=images,
        progress=False,
    )
    costs = layer_costs(teacher, (3, 8, 8))
    limit = budget_limit(budget, costs)
    table = [[layer_cost(c, "wbits", b, 4) for b in CHOICES] for c in costs]
    best = min(
        (
            pick
            for pick in itertools.product(range(3), repeat=len(costs))
            if sum(table[i][k] for i, k in enumerate(pick)) <= limit
        ),
        key=lambda pick: sum(alloc.scores[i][k] for i, k in enumerate(pick)),
    )
    assert alloc.wbits == [CHOICES[k] for k in best]
    assert alloc.cost <= alloc.limit == limit
    student = quantize_model(teacher, alloc.apply(QuantSpec(wbits=4, abits=4)), (3, 8, 8))
    assert [layer.wbits for _, layer in quant_layers(student)] == alloc.wbits


def test_bits_json_round_trip(tmp_path):
    alloc = Allocation(
        allocator="hessian",
        budget="wbits=3",
        kind="wbits",
        limit=30.0,
        layers=["a.0", "b[1]"],
        wbits=[2, 4],
        abits=4,
        cost=30.0,
        choices=[2, 4],
    )
    write_bits(alloc, tmp_path / "bits.json")
    again = read_bits(tmp_path)
    assert again == alloc
    assert QuantSpec(overrides=again.overrides()).for_layer("b[1]").wbits == 4
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ZsqError, match="not a zsq bits.json"):
        read_bits(tmp_path / "bad.json")


def test_impossible_budget_names_the_smallest_cost(teacher, images):
    with pytest.raises(ZsqError, match="smallest achievable cost wbits=4.000"):
        allocate(teacher, image_shape=(3, 8, 8), budget="wbits=3", choices=(4, 8), images=images)


# --- the command line ---------------------------------------------------------------------
def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "zsq", *map(str, args)], capture_output=True, text=True, timeout=600
    )


def _quantize(small_teacher, out, *extra):
    return _cli(
        "quantize",
        *small_teacher,
        "--method",
        "minmax",
        "--out",
        out,
        "--device",
        "cpu",
        "--quiet",
        "--json",
        *extra,
    )


def test_cli_budget_run_and_reuse(tmp_path, small_teacher):
    opts = ["--alloc-opt", "source=gaussian", "--alloc-opt", "samples=16"]
    first = _quantize(small_teacher, tmp_path / "a", "--budget", "wbits=3", *opts)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)["allocation"]
    assert report["within_budget"] and report["cost"] <= report["limit"]
    bits = json.loads((tmp_path / "a" / "bits.json").read_text())
    mean = sum(b * n for b, n in zip(bits["wbits"], _params(small_teacher), strict=True))
    mean /= sum(_params(small_teacher))
    assert mean <= 3.0 + 1e-9
    # the report states the mixed widths, not the --wbits default the allocation overrode
    written = json.loads((tmp_path / "a" / "report.json").read_text())
    assert written["wbits"] == "mixed" and written["abits"] == 4
    assert written["allocation"]["mean_wbits"] == pytest.approx(mean, abs=1e-4)
    markdown = (tmp_path / "a" / "report.md").read_text()
    assert f"| bits | mixed (budget wbits=3, sensitivity): mean W{mean:.2f} A4 |" in markdown
    again = _quantize(small_teacher, tmp_path / "b", "--bits-from", tmp_path / "a")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["allocation"]["wbits"] == report["wbits"]
    # a bits.json edited after the run wrote it is refused, from the folder or the file
    path = tmp_path / "a" / "bits.json"
    path.write_text(path.read_text().replace("[", "[ ", 1))
    for source in (tmp_path / "a", path):
        edited = _quantize(small_teacher, tmp_path / "c", "--bits-from", source)
        assert edited.returncode == 2 and "is not the file the run wrote" in edited.stderr
        assert not (tmp_path / "c").exists()


def test_cli_bops_budget_mixes_activations(tmp_path, small_teacher):
    """Under bops= the sensitivity allocator picks activation widths too (the quantized ReLU
    feeding the second conv), and the run quantizes that site at the chosen width."""
    opts = ["--alloc-opt", "source=gaussian", "--alloc-opt", "samples=16"]
    budget = ["--budget", "bops=25M", "--bit-choices", "2,4,8", "--act-choices", "2,4,8"]
    result = _quantize(small_teacher, tmp_path / "a", *budget, *opts)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["allocation"]
    assert report["within_budget"] and list(report["abits"]) == ["2"]
    assert json.loads(result.stdout)["abits"] == "mixed"  # the chosen widths replace --abits
    bits = json.loads((tmp_path / "a" / "bits.json").read_text())
    assert bits["act_sites"] == ["2"] and bits["act_bits"] == [report["abits"]["2"]]
    activations = json.loads((tmp_path / "a" / "quant.json").read_text())["activations"]
    assert activations["2.act_quant"]["abits"] == report["abits"]["2"]
    assert activations["5.act_quant"]["abits"] == 4  # feeds a pool, not a layer: --abits
    refused = _quantize(
        small_teacher, tmp_path / "b", "--budget", "wbits=3", "--act-choices", "4,8"
    )
    assert refused.returncode == 2 and "bops= budget only" in refused.stderr
    assert not (tmp_path / "b").exists()


def test_cli_reused_bits_are_costed_for_this_run(tmp_path, small_teacher):
    """--bits-from recomputes the cost: the same weight widths at wider activations break a
    bops= budget they met, and the run is refused instead of reporting 'within budget'."""
    opts = ["--alloc-opt", "source=gaussian", "--alloc-opt", "samples=16"]
    budget = ["--budget", "bops=25M", "--bit-choices", "2,4,8", "--act-choices", "off"]
    first = _quantize(small_teacher, tmp_path / "a", *budget, *opts)
    assert first.returncode == 0, first.stderr
    wider = _quantize(small_teacher, tmp_path / "b", "--bits-from", tmp_path / "a", "--abits", "8")
    assert wider.returncode == 2, wider.stdout
    assert "over its budget bops=25M" in wider.stderr and not (tmp_path / "b").exists()


def _params(small_teacher):
    from zsq.models import load_teacher

    model, _ = load_teacher(small_teacher[1], small_teacher[3])
    return [m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget", "wbits=3", "--bit-choices", "4,8"], "smallest achievable cost wbits=4"),
        (["--budget", "size=100B"], "smallest achievable cost size="),
        (["--budget", "wbits=3", "--allocator", "nonsense"], "invalid choice"),
        (["--budget", "bytes=3"], "size="),
        (["--allocator", "hessian"], "need --budget"),
        (["--budget", "wbits=3", "--layer", "0=8"], "drop --layer"),
        (["--budget", "wbits=3", "--allocator", "penalty", "--penalty", "inf"], "finite"),
        (["--budget", "wbits=3", "--alloc-opt", "samples=abc"], "samples takes a whole number"),
    ],
)
def test_cli_bad_budgets_exit_2_with_one_line_and_no_output(
    tmp_path, small_teacher, flags, message
):
    out = tmp_path / "never"
    result = _quantize(small_teacher, out, *flags)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists() and not (tmp_path / "never.partial").exists()


def test_cli_budget_table(small_teacher):
    result = _cli("budget", *small_teacher, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "MACs" in result.stdout or "macs" in result.stdout.lower()
